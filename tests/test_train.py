"""Loss, optimizer, the training loop's outputs, and two processes against one."""

import contextlib
import functools
import json
import math
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core

from lcr import checkpoint, cli, losses, matmul_layout, metrics, optim, step, train
from lcr import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Loss and optimizer against hand-computed references.


def test_cross_entropy_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, (2, 5))
  weights = np.ones((2, 5), np.float32)
  weights[1, 3:] = 0.0
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  sum_loss, sum_weights = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                               jnp.asarray(weights))
  np.testing.assert_allclose(float(sum_loss), (nll * weights).sum(), rtol=1e-5)
  assert float(sum_weights) == 8.0
  # Whatever sits under padding, even non-finite logits, costs nothing.
  logits[1, 4] = np.inf
  targets[1, 3] = (targets[1, 3] + 1) % 7
  again, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(float(again), float(sum_loss), rtol=1e-6)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
  lr = optim.learning_rate(C.TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1))
  expected = {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)),
              100: 0.1}
  for s, want in expected.items():
    np.testing.assert_allclose(float(lr(s)), want, rtol=1e-5, atol=1e-7)


def test_weight_decay_shrinks_matrices_but_not_norms():
  cfg = C.ModelConfig(vocab_size=16, num_layers=1, d_model=8, num_heads=2)
  params = jax.device_get(nn.meta.unbox(jax.jit(step.TransformerLM(cfg).init)(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']))
  params['final_norm']['scale'] = params['final_norm']['scale'] + 0.5   # nonzero to see decay
  tx = optim.optimizer(C.TrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=0))
  zero_grads = jax.tree.map(np.zeros_like, params)   # Adam's part of the update is then exactly 0
  updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['layer_0']['ffn']['wi']['kernel'],
                             params['layer_0']['ffn']['wi']['kernel'] * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(new['token_embedding']['embedding'],
                             params['token_embedding']['embedding'] * 0.95, rtol=1e-6)
  np.testing.assert_array_equal(new['final_norm']['scale'], params['final_norm']['scale'])
  np.testing.assert_array_equal(new['layer_0']['ffn_norm']['bias'], params['layer_0']['ffn_norm']['bias'])


def test_flops_per_token_and_device_peaks():
  # GPT-2-style config a: 4 layers, d 128, T 64, 813,312 parameters (6N + 6LTD, Kaplan et al. 2020).
  cfg = C.ModelConfig(vocab_size=128, num_layers=4, d_model=128, num_heads=4)
  assert metrics.flops_per_token(cfg, 813_312, 64) == 6 * 813_312 + 6 * 4 * 64 * 128
  assert metrics.peak_flops('TPU v4', 'bfloat16') == 275e12
  assert metrics.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == 494e12
  assert metrics.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert metrics.peak_flops('cpu', 'float32') is None
  line = metrics.Progress(100, 0, 1000).line(
      40, {'loss': 2.5, 'lr': 1e-3, 'grad_norm': 0.5, 'tokens_per_s': 12345.0, 'eta_s': 75.0})
  assert line == 'step 40/100 (40%)  loss 2.5000  lr 0.001  |g| 0.5  12,345 tok/s  ETA 1m15s'


class _AuxModel(nn.Module):
  """Logits from a table; sows 0.5·Σw² as an auxiliary loss."""

  @nn.compact
  def __call__(self, tokens, positions, segment_ids, deterministic=True):
    w = self.param('w', nn.initializers.constant(0.1), (4, 4))
    self.sow(step.AUX_LOSSES, 'l2', 0.5 * jnp.sum(w ** 2))
    return w[tokens]


def test_auxiliary_losses_the_model_sows_are_added():
  model = _AuxModel()
  params = {'w': jnp.full((4, 4), 0.1)}
  batch = dict(inputs=jnp.zeros((1, 3), jnp.int32), targets=jnp.ones((1, 3), jnp.int32),
               positions=jnp.zeros((1, 3), jnp.int32), segment_ids=jnp.ones((1, 3), jnp.int32),
               weights=jnp.ones((1, 3)))
  _, aux = step.forward(model, params, batch)
  np.testing.assert_allclose(float(aux), 0.5 * 16 * 0.01, rtol=1e-6)
  tx = optax.sgd(1.0)
  train_step = jax.jit(step.make_train_step(model, tx, lambda s: 1.0, seed=0))
  state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  new, m = train_step(state, batch)
  # Uniform logits: cross-entropy log 4 with gradient softmax − onehot(1) in row 0 only; the L2
  # term's gradient is w itself, so SGD at rate 1 gives w − w − ∂CE = −∂CE (rows 1–3 → 0, not 0.1).
  np.testing.assert_allclose(float(m['loss']), math.log(4), rtol=1e-6)
  np.testing.assert_allclose(float(m['aux_loss']), 0.08, rtol=1e-6)
  expected = np.zeros((4, 4))
  expected[0] = [-0.25, 0.75, -0.25, -0.25]
  np.testing.assert_allclose(np.asarray(new.params['w']), expected, atol=1e-6)


def _dot_ranks(jaxpr) -> list[tuple[int, int]]:
  """(lhs rank, rhs rank) of every dot_general in a jaxpr and its sub-jaxprs (scan, remat, jit)."""
  ranks = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      ranks.append((eqn.invars[0].aval.ndim, eqn.invars[1].aval.ndim))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          ranks += _dot_ranks(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          ranks += _dot_ranks(sub)
  return ranks


@pytest.mark.parametrize('tied', [True, False])
def test_two_d_matmul_layout_keeps_loss_and_gradients(tied):
  """An invariant: the 2-D matmul layout reshapes the dense layers' products, so gradients equal
  those of the 3-D layout; and it really removed every [B, T, D] × [D, F] product."""
  cfg = C.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                      scan_layers=True, remat=True, tie_embeddings=tied)
  model = step.TransformerLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1], positions)['params']

  def loss(params, two_d):
    with matmul_layout.two_d_matmuls() if two_d else contextlib.nullcontext():
      logits = model.apply({'params': params}, tokens[:, :-1], positions)
    return losses.cross_entropy(logits, tokens[:, 1:], jnp.ones((2, 8)))[0]

  grads = {two_d: jax.jit(jax.grad(functools.partial(loss, two_d=two_d)))(params)
           for two_d in (True, False)}
  for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The dense layers' [B, T, D] × [D, F] products became [B·T, D] × [D, F].
  dense_3d = {two_d: sum(r == (3, 2) for r in _dot_ranks(
      jax.make_jaxpr(functools.partial(loss, two_d=two_d))(params).jaxpr)) for two_d in (True, False)}
  assert dense_3d[False] > 0 and dense_3d[True] == 0


# ----------------------------------------------------------------------------------------------
# The loop, on an in-memory corpus.


class ArrayData:
  """Deterministic random batches with get_state/set_state, like a grain iterator."""

  def __init__(self, vocab: int, batch: int, seq_len: int, nan_at: int | None = None):
    self.vocab, self.batch, self.seq_len, self.nan_at, self.index = vocab, batch, seq_len, nan_at, 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng(self.index)
    self.index += 1
    tokens = rng.integers(0, self.vocab, (self.batch, self.seq_len + 1)).astype(np.int32)
    weights = np.ones((self.batch, self.seq_len), np.float32)
    if self.index == self.nan_at:
      weights[:] = np.nan
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                positions=np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), weights.shape),
                segment_ids=np.ones(weights.shape, np.int32), weights=weights)

  def get_state(self):
    return {'index': self.index}

  def set_state(self, state):
    self.index = state['index']


def array_data(cfg: C.Config, nan_at: int | None = None) -> train.Data:
  held_out = ArrayData(cfg.model.vocab_size, cfg.train.batch_size, cfg.train.seq_len)
  def validation():
    held_out.index = 10_000
    return [next(held_out) for _ in range(cfg.train.eval_batches)]
  return train.Data(vocab_size=cfg.model.vocab_size, train=ArrayData(
      cfg.model.vocab_size, cfg.train.batch_size, cfg.train.seq_len, nan_at), validation=validation)


def loop_config(**train_fields) -> C.Config:
  fields = dict(steps=6, batch_size=8, seq_len=16, warmup_steps=1, log_every=2, eval_every=3,
                eval_batches=1, checkpoint_every=3, keep_checkpoints=2)
  fields.update(train_fields)
  return cli.load('configs/lm.py:smoke', [f'train.{k}={v}' for k, v in fields.items()] +
                  ['model.vocab_size=32'])


def test_loop_writes_metrics_tensorboard_and_config(tmp_path):
  cfg = loop_config()
  final = train.train(cfg, str(tmp_path), array_data(cfg))
  records = metrics.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [2, 3, 4, 6]          # log_every 2, eval_every 3
  for r in records:
    if r['step'] % 2 == 0:
      assert {'step', 'loss', 'lr', 'grad_norm', 'tokens_per_s'} <= set(r)
      assert math.isfinite(r['loss']) and r['tokens_per_s'] > 0
  assert {'val_loss', 'val_tokens'} <= set(records[1]) and records[1]['val_tokens'] == 8 * 16
  assert final['step'] == 6 and final['val_loss'] == records[-1]['val_loss']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path / 'tensorboard'))
  with open(tmp_path / 'config.json') as f:
    assert C.from_config_dict(json.load(f)) == cfg
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  cfg = loop_config()
  with pytest.raises(train.TrainingError, match=r'loss is nan at step 5'):
    train.train(cfg, str(tmp_path), array_data(cfg, nan_at=5))
  # The checkpoint before the bad step is kept; none is written after it.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']


def test_finished_run_reevaluates_without_training(tmp_path):
  """An invariant: rerunning a finished run trains nothing and evaluates the same parameters."""
  cfg = loop_config()
  first = train.train(cfg, str(tmp_path), array_data(cfg))
  lines = (tmp_path / 'metrics.jsonl').read_text()
  again = train.train(cfg, str(tmp_path), array_data(cfg))
  assert again['step'] == 6 and again['val_loss'] == pytest.approx(first['val_loss'], rel=1e-6)
  assert (tmp_path / 'metrics.jsonl').read_text() == lines
  params, saved = checkpoint.load_params(str(tmp_path))
  assert saved == cfg and params['token_embedding']['embedding'].shape == (32, 32)


# ----------------------------------------------------------------------------------------------
# Two processes (4 CPU devices each) against one process with 8.

_WORKER = r'''
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from lcr import cli, train
config = cli.load('configs/lm.py:smoke', sys.argv[4:])
assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
train.train_and_evaluate(config, sys.argv[3])
'''


class _Concat:
  """One process reading every host's shard: the global batch is the shards stacked in order."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {str(i): it.get_state() for i, it in enumerate(self.iterators)}

  def set_state(self, state):
    for i, it in enumerate(self.iterators):
      it.set_state(state[str(i)])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_give_the_losses_of_one(tmp_path):
  """An invariant is the only reference here: two processes of 4 devices each, reading their own
  shards, log the losses of one process of 8 devices that reads both shards."""
  overrides = ['mesh.shape=(2,2,2)', f'data.data_dir={tmp_path / "data"}', 'train.steps=4',
               'train.log_every=1', 'train.eval_every=2', 'train.checkpoint_every=0',
               'train.tensorboard=false']
  config = cli.load('configs/lm.py:smoke', overrides)
  shards = [train.open_data(config, process_index=i, process_count=2) for i in range(2)]
  data = train.Data(vocab_size=shards[0].vocab_size, train=_Concat([s.train for s in shards]),
                    validation=lambda: map(lambda *b: {k: np.concatenate([x[k] for x in b])
                                                       for k in b[0]},
                                           *[s.validation() for s in shards]))
  train.train(train.with_vocab(config, data.vocab_size), str(tmp_path / 'one'), data)

  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  address = f'localhost:{_free_port()}'
  procs = [subprocess.Popen([sys.executable, '-c', _WORKER, address, str(i), str(tmp_path / 'two'),
                             *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]

  one, two = metrics.read_metrics(str(tmp_path / 'one')), metrics.read_metrics(str(tmp_path / 'two'))
  assert [r['step'] for r in one] == [r['step'] for r in two] == [1, 2, 3, 4]
  for a, b in zip(one, two):
    for key in ('loss', 'grad_norm', 'lr', 'val_loss'):
      if key in a or key in b:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=f'{key} at step {a["step"]}')
