"""Training regimes and the trainer, against references that do not share their mechanism.

* Two-pass (Mihaylova & Martins 2019) and parallel (Duckworth et al. 2019) scheduled sampling:
  with ε = 0 and the softmax-weighted mixture (no randomness) the gradient equals the gradient of
  a teacher-forced pass on inputs recomputed here and held constant: nothing flows through the
  earlier passes (with the two stop_gradients of lcr.seq2seq.tips removed, both cases fail).
* Step-by-step scheduled sampling (Bengio et al. 2015): with ε = 1 it is teacher forcing; with
  ε = 0 and argmax it is self-consistent (a teacher-forced pass on its own argmax inputs gives its
  log-probabilities).
* The configured auxiliary losses enter the loss with their weights.
* The RL step weights each sampled token by sentence BLEU of the sample minus that of the greedy
  decode (Rennie et al. 2017 eq. 7), recomputed with sacrebleu on strings.
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


@pytest.mark.parametrize('regime,passes', [('two_pass', 2), ('parallel', 3)])
def test_scheduled_sampling_gradient_flows_through_the_last_pass_only(regime, passes):
  """Two-pass (Mihaylova & Martins 2019) and parallel with 3 passes (Duckworth et al. 2019)."""
  cfg, the_arch, params, batch = make(training=regime, ss_passes=passes, ss_mix='softmax',
                                      ss_decay='exponential', ss_k=0.5)
  step = 500                                         # ε = 0.5^500 = 0: every input is the model's
  got = jax.jit(jax.grad(lambda p: ce(tips.REGIMES[regime](the_arch, p, batch, step, jax.random.key(1)))))(params)

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


def test_rl_step_weights_sampled_tokens_by_sample_minus_greedy_bleu():
  """Rennie et al. 2017 eq. 7 in the RL step: every sampled token's loss weight is the sample's
  sentence BLEU minus the greedy decode's (sacrebleu called here, on strings), so a sample that
  beats the greedy decode gets a positive weight and one that loses a negative one."""
  import sacrebleu
  from lcr.seq2seq import rl
  cfg = make(rl={'steps': 1, 'init': 'unused', 'batch_size': 8})[0]
  step = rl.Step(train_lib.make_setup(cfg), cfg)
  sources = [list('dab'), list('cc')] * 4                       # 8 rows: one per simulated device
  outputs = {'sample': [list('zpwk'), list('quq')] * 4, 'greedy': [list('zpw'), list('ququ')] * 4}
  step.generator = lambda params, sources, strategy, **kw: [
      np.concatenate([tasks.encode(o), [tasks.EOS_ID]]).astype(np.int32) for o in outputs[strategy]]
  seen = {}

  def update(state, batch, num_sequences):
    seen.update(batch)
    return state, 0.0, 0.0
  step.update = update
  sizes = step.row['source'], step.row['target_out'] - 1
  refs = [tasks.REGISTRY['rewrite'].target(s) for s in sources]    # zpwk, ququ
  local = {'source': np.zeros((8, sizes[0]), np.int32), 'target': np.zeros((8, sizes[1]), np.int32),
           'source_length': np.array([len(s) for s in sources]),
           'target_length': np.array([len(t) for t in refs])}
  for b, (src, tgt) in enumerate(zip(sources, refs)):
    local['source'][b, :len(src)] = tasks.encode(src)
    local['target'][b, :len(tgt)] = tasks.encode(tgt)
  _, metrics = step(train_lib.TrainState(jnp.zeros((), jnp.int32), None, None), local)
  score = lambda hyp, ref: sacrebleu.sentence_bleu(' '.join(hyp), [' '.join(ref)]).score / 100
  want = [score(s, r) - score(g, r) for s, g, r in zip(outputs['sample'], outputs['greedy'], refs)]
  assert want[0] > 0 > want[1]
  weights, mask = np.asarray(seen['weights']), np.asarray(seen['target_out_segment_ids']) > 0
  for b in range(8):
    np.testing.assert_allclose(weights[b][mask[b]], want[b], rtol=1e-6)
    assert mask[b].sum() == len(outputs['sample'][b]) + 1          # the sample and its EOS
  np.testing.assert_allclose(metrics['reward_sample'] - metrics['reward_greedy'], np.mean(want), rtol=1e-6)
