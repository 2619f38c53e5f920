"""Training regimes and the trainer, against references that do not share their mechanism.

* Two-pass (Mihaylova & Martins 2019) and parallel (Duckworth et al. 2019) scheduled sampling:
  with ε = 0 and the softmax-weighted mixture (no randomness) the gradient equals the gradient of
  a teacher-forced pass on inputs recomputed here and held constant: nothing flows through the
  earlier passes (letting it flow changes the gradient by ~10 %: the mutation in docs/seq2seq.md).
* Step-by-step scheduled sampling (Bengio et al. 2015): with ε = 1 it is teacher forcing; with
  ε = 0 and argmax it is self-consistent (a teacher-forced pass on its own argmax inputs gives its
  log-probabilities).
* The configured auxiliary losses enter the loss with their weights.
* A training run stopped after a checkpoint and resumed ends with the uninterrupted run's metrics.
"""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr.config import from_config_dict
from lcr.seq2seq import arch as arch_lib
from lcr.seq2seq import data, tasks, tips
from lcr.seq2seq import train as train_lib

V = tasks.VOCAB_SIZE


def make(pack=2, **seq2seq):
  cfg = from_config_dict({
      'model': dict(arch='encoder_decoder', vocab_size=V, num_layers=1, d_model=16, num_heads=2,
                    pos='rope', attention_backend='xla'),
      'train': dict(steps=4, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                    tensorboard=False),
      'seq2seq': {'task': dict(name='rewrite', train_len=3, pack=pack), **seq2seq}})
  the_arch = arch_lib.make(cfg)
  params = nn.meta.unbox(jax.jit(the_arch.init)(jax.random.key(0)))
  params = jax.tree.map(lambda p: p * 1.5, params)
  batch = {k: jnp.asarray(v) for k, v in next(data.make_train_iterator(cfg, the_arch, 2, pack=pack)).items()}
  return cfg, the_arch, params, batch


def ce(scores):
  nll, count = tips.cross_entropy(scores)
  return nll / count


def test_scheduled_sampling_gradient_flows_through_the_last_pass_only():
  """Parallel scheduled sampling with 3 passes (two_pass is the same code with 2)."""
  passes = 3
  cfg, the_arch, params, batch = make(training='parallel', ss_passes=passes, ss_mix='softmax',
                                      ss_decay='exponential', ss_k=0.5)
  step = 500                                         # ε = 0.5^500 = 0: every input is the model's
  got = jax.jit(jax.grad(lambda p: ce(tips.REGIMES['parallel'](the_arch, p, batch, step, jax.random.key(1)))))(params)

  def next_inputs(log_probs):
    """The previous pass's softmax, shifted right by one; each example's BOS stays."""
    probs = jnp.exp(log_probs)
    shifted = jnp.concatenate([jnp.zeros_like(probs[:, :1]), probs[:, :-1]], axis=1)
    bos = jax.nn.one_hot(batch['target_in'], V)
    return jnp.where((batch['target_in_positions'] == 0)[..., None], bos, shifted)

  def inputs_of(p):
    inputs = None
    for _ in range(passes - 1):
      inputs = next_inputs(the_arch.forward(p, batch, inputs=inputs).log_probs)
    return inputs

  def reference(p):
    constant = inputs_of(p)    # evaluated at the same parameters, then held fixed
    return jax.grad(lambda q: ce(the_arch.forward(q, batch, inputs=jax.lax.stop_gradient(constant))))(p), constant
  want, constant = jax.jit(reference)(params)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  np.testing.assert_allclose(flat(got), flat(want), rtol=1e-4, atol=1e-6)
  assert not np.allclose(np.asarray(constant), np.asarray(jax.nn.one_hot(batch['target_in'], V)))


def test_two_pass_is_multi_pass_with_two_passes(monkeypatch):
  seen = []
  monkeypatch.setattr(tips, 'multi_pass', lambda *args: seen.append(args[-1]))
  tips.REGIMES['two_pass'](None, None, None, 0, None)
  tips.REGIMES['parallel'](type('A', (), {'tips': type('T', (), {'ss_passes': 5})})(), None, None, 0, None)
  assert seen == [2, 5]


def test_step_by_step_scheduled_sampling():
  cfg, the_arch, params, batch = make(pack=1, training='scheduled_sampling', ss_mix='argmax',
                                      ss_decay='exponential', ss_k=0.5)
  rng = jax.random.key(2)
  run = jax.jit(lambda p, step: tips.scheduled_sampling(the_arch, p, batch, step, rng).log_probs)
  forced = jax.jit(lambda p, inputs: the_arch.forward(p, {**batch, 'target_in': inputs}).log_probs)
  mask = np.asarray(batch['target_out_segment_ids'] > 0)
  # ε = 0.5^0 = 1: the gold inputs, i.e. teacher forcing (through the cache, step by step).
  gold = np.asarray(forced(params, batch['target_in']))
  np.testing.assert_allclose(np.asarray(run(params, 0))[mask], gold[mask], rtol=1e-5, atol=1e-4)
  # ε = 0: every input after BOS is the argmax of the previous step.
  own = np.asarray(run(params, 500))
  inputs = np.concatenate([np.asarray(batch['target_in'][:, :1]), own.argmax(-1)[:, :-1]], axis=1)
  again = np.asarray(forced(params, jnp.asarray(inputs, jnp.int32)))
  np.testing.assert_allclose(own[mask], again[mask], rtol=1e-5, atol=1e-4)
  assert not np.allclose(own[mask], gold[mask], atol=1e-2)


def test_auxiliary_losses_enter_with_their_weights():
  cfg, the_arch, params, batch = make(pointer=True, coverage_weight=0.3, guided_weight=0.7)
  loss, logged = jax.jit(lambda p: train_lib.loss_fn(the_arch, p, batch, 0, jax.random.key(0)))(params)
  scores = jax.jit(lambda p: the_arch.forward(p, batch))(params)
  tokens = float(jnp.sum(scores.mask))
  guided = float(tips.guided_attention_loss(scores.attention, batch, 0.2)) / tokens
  coverage = float(tips.coverage_loss(scores.attention, scores.mask)) / tokens
  np.testing.assert_allclose(float(loss), float(ce(scores)) + 0.7 * guided + 0.3 * coverage, rtol=1e-5)
  np.testing.assert_allclose([float(logged['guided']), float(logged['coverage'])], [guided, coverage],
                             rtol=1e-5)
  assert guided > 0 and coverage > 0


class _Stop(Exception):
  pass


def test_training_resumes_where_it_stopped(tmp_path, monkeypatch):
  """A run that dies after its step-2 checkpoint, re-run, ends with the straight run's metrics."""
  cfg = make()[0]
  straight = train_lib.train(cfg, str(tmp_path / 'straight'))
  real = data.make_train_iterator

  def dying(*args, **kwargs):
    it = real(*args, **kwargs)

    class Dies:
      def __init__(self):
        self.n = 0

      def __next__(self):
        self.n += 1
        if self.n == 3:
          raise _Stop()
        return next(it)

      def get_state(self):
        return it.get_state()

      def set_state(self, state):
        it.set_state(state)
    return Dies()
  monkeypatch.setattr(data, 'make_train_iterator', dying)
  with pytest.raises(_Stop):
    train_lib.train(cfg, str(tmp_path / 'resumed'))
  monkeypatch.setattr(data, 'make_train_iterator', real)
  resumed = train_lib.train(cfg, str(tmp_path / 'resumed'))
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-5)
  lines = [json.loads(l) for l in open(tmp_path / 'resumed' / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [1, 2, 3, 4]
