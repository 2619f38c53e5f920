"""Mixture of experts: routing, capacity and drop order, auxiliary losses, the sown metrics, the
dense limit, causality, expert-parallel sharding, config errors; references recomputed in NumPy."""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import checkpoint, cli, layers, metrics, moe, sharding, step, study, train
from lcr import config as C
from lcr.data.config import DataConfig
from lcr.model import TransformerLM


def moe_cfg(**fields) -> C.ModelConfig:
  model = dict(vocab_size=40, num_layers=2, d_model=32, num_heads=4, pos='rope', ffn='moe',
               ffn_dim=48, moe=C.MoeConfig(num_experts=4, top_k=2, capacity_factor=1.0))
  model.update(fields)
  return C.ModelConfig(**model)


def unbox(tree):
  return nn.meta.unbox(tree)


# ----------------------------------------------------------------------------------------------
# Auxiliary losses against hand-computed values.

# Router probabilities of 4 tokens over 3 experts (logits = log p, so softmax gives p back).
PROBS = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]])


def test_balance_loss_by_hand_for_top1_and_top2():
  # Top-1: experts 0, 0, 1, 2 → f = (2, 1, 1)/4; P = column means (1.5, 1.4, 1.1)/4.
  # 3 · (0.5·0.375 + 0.25·0.35 + 0.25·0.275) = 3 · 0.34375 = 1.03125.
  r = moe.route(jnp.log(jnp.asarray(PROBS))[None], 1, renormalize=False)
  np.testing.assert_array_equal(np.asarray(r.experts)[0, :, 0], [0, 0, 1, 2])
  np.testing.assert_allclose(float(moe.balance_loss(r.probs, r.experts)), 1.03125, rtol=1e-6)
  # Top-2 on other probabilities: choices {0,1} {0,2} {1,2} {2,1} → f = (2, 3, 3)/8 (the fraction
  # of the k·T assignments); P = (1.4, 1.1, 1.5)/4. 3 · (0.25·0.35 + 0.375·0.275 + 0.375·0.375).
  probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
  r = moe.route(jnp.log(jnp.asarray(probs))[None], 2, renormalize=True)
  np.testing.assert_allclose(float(moe.balance_loss(r.probs, r.experts)), 3 * 0.33125, rtol=1e-6)


def test_balance_loss_gradient_flows_through_the_mean_probabilities_only():
  # ∂/∂p[b,t,i] of N·Σ f_i·P_i with P_i = mean over the B·T tokens of p[., ., i]: N·f_i/(B·T).
  r = moe.route(jnp.log(jnp.asarray(PROBS))[None], 1, renormalize=False)
  grad = jax.grad(moe.balance_loss)(r.probs, r.experts)
  want = np.broadcast_to(3 * np.array([0.5, 0.25, 0.25]) / 4, (1, 4, 3))
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6)


def test_balance_loss_is_one_when_balanced_and_larger_when_not():
  # Each token's top choice a different expert, whatever the probabilities: exactly 1.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 4)) + 6 * np.eye(4)[None]
  r = moe.route(jnp.asarray(logits), 1, renormalize=False)
  np.testing.assert_array_equal(np.asarray(r.experts)[..., 0], [[0, 1, 2, 3]] * 2)
  np.testing.assert_allclose(float(moe.balance_loss(r.probs, r.experts)), 1.0, rtol=1e-6)
  skewed = moe.route(jnp.asarray(logits + 8 * np.eye(4)[0]), 1, renormalize=False)  # all → expert 0
  assert float(moe.balance_loss(skewed.probs, skewed.experts)) > 3.0


def test_z_loss_by_hand():
  # logsumexp(log [1, 1, 2]) = ln 4, logsumexp(log [1, 2, 5]) = ln 8: mean of squares 6.5·(ln 2)².
  logits = jnp.log(jnp.asarray([[[1.0, 1.0, 2.0], [1.0, 2.0, 5.0]]]))
  np.testing.assert_allclose(float(moe.z_loss(logits)), 6.5 * math.log(2) ** 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Routing, capacity, dispatch and combine against a NumPy restatement.


def test_capacity_formula():
  def cap(t, e, k, cf):
    return moe.capacity(t, C.MoeConfig(num_experts=e, top_k=k, capacity_factor=cf,
                                       renormalize=k > 1))
  assert cap(16, 4, 2, 1.25) == 10 and cap(16, 4, 2, 1.0) == 8 and cap(7, 3, 2, 1.0) == 5
  assert cap(16, 4, 1, 0.0) == 16 and cap(16, 4, 2, -1.0) == 16      # dropless: every token fits
  assert cap(16, 4, 2, 10.0) == 16                                   # never more than T


def test_drop_order_by_hand():
  # One row, top-1, 2 experts, capacity 2: experts 0 0 0 1 0 → slots 0 1 2 0 3; tokens 2 and 4
  # find expert 0 full and are dropped.
  experts = jnp.asarray([[[0], [0], [0], [1], [0]]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(moe.assign_slots(experts, 2))[0, :, 0], [0, 1, 2, 0, 3])
  x = jnp.arange(1.0, 6.0)[None, :, None]                              # token i carries i + 1
  expert_in = np.asarray(moe.dispatch(x, experts, moe.assign_slots(experts, 2), 2, 2))
  np.testing.assert_array_equal(expert_in[0, :, :, 0], [[1, 2], [4, 0]])   # [expert, slot]
  # Top-2: token 0's second choice comes before token 1's first (position-major order).
  two = jnp.asarray([[[1, 0], [0, 1], [0, 1]]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(moe.assign_slots(two, 2))[0], [[0, 0], [1, 1], [2, 2]])


@pytest.mark.parametrize('k, renormalize, cap', [(1, False, 2), (2, True, 3), (2, False, 3),
                                                  (3, True, 7)])
def test_routing_dispatch_and_combine_match_numpy(k, renormalize, cap):
  rng = np.random.default_rng(k * 10 + cap)
  b, t, e, d = 2, 7, 4, 3
  logits = rng.normal(size=(b, t, e)) * 2
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  r = moe.route(jnp.asarray(logits, jnp.float32), k, renormalize)
  # Router: top-k of the softmax, best first; gates renormalised to sum 1 or the probabilities.
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want_experts = np.argsort(-p, axis=-1, kind='stable')[..., :k]
  want_gates = np.take_along_axis(p, want_experts, -1)
  if renormalize:
    want_gates /= want_gates.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(r.experts), want_experts)
  np.testing.assert_allclose(np.asarray(r.gates), want_gates, rtol=1e-5)
  # Slots: count earlier assignments of the same expert, token by token, choices in rank order.
  want_slots = np.zeros((b, t, k), int)
  want_in = np.zeros((b, e, cap, d), np.float32)
  for row in range(b):
    used = [0] * e
    for tok in range(t):
      for j in range(k):
        ex = want_experts[row, tok, j]
        want_slots[row, tok, j] = used[ex]
        if used[ex] < cap:
          want_in[row, ex, used[ex]] = x[row, tok]
        used[ex] += 1
  slots = np.asarray(moe.assign_slots(r.experts, e))
  np.testing.assert_array_equal(slots, want_slots)
  assert (0 < (want_slots >= cap).sum() < want_slots.size) or k == 3   # some kept, some dropped
  expert_in = moe.dispatch(jnp.asarray(x), r.experts, jnp.asarray(slots), e, cap)
  np.testing.assert_array_equal(np.asarray(expert_in), want_in)
  # Combine: each kept choice's expert output weighted by its gate; dropped choices add nothing.
  out = rng.normal(size=(b, e, cap, d)).astype(np.float32)
  want_y = np.zeros((b, t, d))
  for row, tok, j in np.ndindex(b, t, k):
    if want_slots[row, tok, j] < cap:
      want_y[row, tok] += want_gates[row, tok, j] * out[row, want_experts[row, tok, j],
                                                         want_slots[row, tok, j]]
  y = moe.combine(jnp.asarray(out), r.experts, jnp.asarray(slots), r.gates)
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The layer: the dense limit, gradients, jitter, sown metrics.


def _layer(cfg, x):
  layer = moe.MoeFfn(cfg)
  return layer, unbox(jax.jit(layer.init)(jax.random.key(1), x)['params'])


@pytest.mark.parametrize('kind', ['mlp', 'swiglu'])
def test_one_expert_top1_dropless_equals_the_dense_ffn(kind):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 32)), jnp.float32)
  cfg = moe_cfg(moe=C.MoeConfig(num_experts=1, top_k=1, capacity_factor=0.0, renormalize=False,
                                expert_ffn=kind))
  layer, params = _layer(cfg, x)
  dense_cfg = moe_cfg(ffn=kind, moe=C.MoeConfig())
  dense = layers.FFNS[kind](dense_cfg)
  names = ('wi_gate', 'wi_up', 'wo') if kind == 'swiglu' else ('wi', 'wo')
  dense_params = {n: {'kernel': params[n][0]} for n in names}
  want = jax.jit(dense.apply)({'params': dense_params}, x)
  np.testing.assert_allclose(np.asarray(jax.jit(layer.apply)({'params': params}, x)),
                             np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bfloat16_experts_with_a_float32_router():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 8, 32)), jnp.bfloat16)
  x = x.astype(jnp.float32)
  layer, params = _layer(moe_cfg(), x)   # x exact in bfloat16: both route the same
  half = moe.MoeFfn(moe_cfg(dtype='bfloat16'))
  (y16, s16), (y32, s32) = (
      jax.jit(lambda v, m=m: m.apply({'params': params}, v, mutable=[layers.MODEL_METRICS]))(v)
      for m, v in ((half, x.astype(jnp.bfloat16)), (layer, x)))
  assert y16.dtype == jnp.bfloat16 and params['router'].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=0.05)
  # The router ran in float32: its z-loss (a function of the logits alone) is the float32 one.
  z16, z32 = (float(s[layers.MODEL_METRICS]['z_loss'][0]) for s in (s16, s32))
  np.testing.assert_allclose(z16, z32, rtol=1e-6)


def test_gradients_reach_the_router_from_the_loss_and_the_auxiliary_losses():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 32)), jnp.float32)
  target = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 32)), jnp.float32)
  for k, renormalize in ((1, False), (2, True)):
    cfg = moe_cfg(moe=C.MoeConfig(num_experts=4, top_k=k, renormalize=renormalize))
    layer, params = _layer(cfg, x)

    def task(p):
      return jnp.sum(layer.apply({'params': p}, x) * target)

    def aux(p):
      _, sown = layer.apply({'params': p}, x, mutable=[layers.AUX_LOSSES])
      return sum(jnp.sum(v) for v in jax.tree.leaves(sown))
    for loss in (task, aux):
      grad = np.asarray(jax.jit(jax.grad(loss))(params)['router'])
      assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-6, (k, loss.__name__)


def test_jitter_only_in_training():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 16, 32)), jnp.float32)
  plain, params = _layer(moe_cfg(), x)
  jittered = moe.MoeFfn(moe_cfg(moe=C.MoeConfig(num_experts=4, capacity_factor=1.0, jitter=0.5)),
                        deterministic=False)
  evaluation = jittered.clone(deterministic=True)
  base = jax.jit(plain.apply)({'params': params}, x)
  np.testing.assert_array_equal(jax.jit(evaluation.apply)({'params': params}, x), base)
  train_apply = jax.jit(lambda key: jittered.apply({'params': params}, x, rngs={'dropout': key}))
  a, b = (train_apply(jax.random.key(s)) for s in (1, 2))
  assert not np.allclose(a, base) and not np.allclose(a, b)


def test_sown_losses_and_metrics_match_numpy():
  x = np.random.default_rng(6).normal(size=(2, 12, 32)).astype(np.float32)
  cfg = moe_cfg(moe=C.MoeConfig(num_experts=4, top_k=2, capacity_factor=1.0, balance_coef=0.5,
                                z_coef=0.25))
  layer, params = _layer(cfg, jnp.asarray(x))
  _, sown = jax.jit(lambda v: layer.apply({'params': params}, v, mutable=[
      layers.AUX_LOSSES, layers.MODEL_METRICS]))(jnp.asarray(x))
  logits = x.astype(np.float64) @ np.asarray(params['router'], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1)[..., :2]
  counts = np.bincount(top.ravel(), minlength=4)
  balance = 4 * np.sum(counts / counts.sum() * p.mean((0, 1)))
  z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  cap = math.ceil(2 * 12 / 4 * 1.0)
  dropped = sum(max(0, np.sum(top[row] == ex) - cap) for row in range(2) for ex in range(4))
  got = {k: float(v[0]) for k, v in sown[layers.MODEL_METRICS].items()}
  np.testing.assert_allclose(got['balance_loss'], balance, rtol=1e-5)
  np.testing.assert_allclose(got['z_loss'], z, rtol=1e-5)
  np.testing.assert_allclose(got['expert_load'], counts.max() / counts.mean(), rtol=1e-6)
  np.testing.assert_allclose(got['dropped_fraction'], dropped / top.size, rtol=1e-6)
  assert dropped > 0
  aux = {k: float(v[0]) for k, v in sown[layers.AUX_LOSSES].items()}
  np.testing.assert_allclose([aux['balance_loss'], aux['router_z_loss']], [0.5 * balance, 0.25 * z],
                             rtol=1e-5)


def test_flops_count_the_experts_a_token_uses():
  cfg = moe_cfg(num_layers=4, moe=C.MoeConfig(num_experts=8, top_k=2, every=2, expert_ffn='swiglu'))
  per_expert = 3 * 32 * 48
  assert moe.expert_params(cfg) == (2 * 8 * per_expert, 2 * 2 * per_expert)   # layers 1 and 3
  assert metrics.flops_per_token(cfg, 100_000, 16) == (
      6 * (100_000 - 12 * per_expert) + 6 * 4 * 16 * 32)


# ----------------------------------------------------------------------------------------------
# In the model: causality, every n-th layer, scanned layers, the trainer's metrics.


def test_changing_future_tokens_never_changes_past_logits_even_when_tokens_are_dropped():
  cfg = moe_cfg(moe=C.MoeConfig(num_experts=4, top_k=2, capacity_factor=0.5))
  model = TransformerLM(cfg)
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, 40, size=(2, 24))
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens))['params']
  apply = jax.jit(lambda t: model.apply({'params': params}, t, mutable=[layers.MODEL_METRICS]))
  changed = tokens.copy()
  changed[:, 13:] = rng.integers(0, 40, size=(2, 11))
  (a, sown), (b, _) = apply(jnp.asarray(tokens)), apply(jnp.asarray(changed))
  assert float(sown[layers.MODEL_METRICS]['layer_0']['ffn']['dropped_fraction'][0]) > 0.2
  np.testing.assert_allclose(np.asarray(a)[:, :13], np.asarray(b)[:, :13], atol=1e-5)
  assert not np.allclose(np.asarray(a)[:, 13:], np.asarray(b)[:, 13:])


def test_every_nth_layer_is_moe_and_scanned_layers_keep_the_sown_losses():
  cfg = moe_cfg(num_layers=4, moe=C.MoeConfig(num_experts=4, every=2, expert_ffn='geglu'))
  assert [cfg.ffn_kind(i) for i in range(4)] == ['geglu', 'moe', 'geglu', 'moe']
  tokens = jnp.asarray(np.random.default_rng(8).integers(0, 40, size=(2, 16)))
  model = TransformerLM(cfg)
  params = unbox(jax.jit(model.init)(jax.random.key(0), tokens)['params'])
  assert set(params['layer_1']['ffn']) == {'router', 'wi_gate', 'wi_up', 'wo'}
  assert params['layer_1']['ffn']['wo'].shape == (4, 48, 32)
  assert set(params['layer_0']['ffn']) == {'wi_gate', 'wi_up', 'wo'}
  # The same parameters stacked for nn.scan over groups of `every` layers: same logits, same
  # auxiliary losses, and the metrics land on the right layers.
  scanned = TransformerLM(dataclasses.replace(cfg, scan_layers=True))
  groups = {f'block_{j}': jax.tree.map(lambda *a: jnp.stack(a), *[params[f'layer_{g * 2 + j}']
                                                                    for g in range(2)])
            for j in range(2)}
  stacked = {**{k: v for k, v in params.items() if not k.startswith('layer_')}, 'layers': groups}
  batch = dict(inputs=tokens, positions=jnp.broadcast_to(jnp.arange(16), (2, 16)),
               segment_ids=jnp.ones((2, 16), jnp.int32))
  (la, sa), (lb, sb) = (jax.jit(lambda p, m=m: step.forward_sown(m, p, batch))(p)
                        for m, p in ((model, params), (scanned, stacked)))
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-5)
  aux_a, aux_b = (float(step.sown_aux_loss(s)) for s in (sa, sb))
  assert aux_a > 0
  np.testing.assert_allclose(aux_b, aux_a, rtol=1e-5)
  ma = moe.summarize(sa[layers.MODEL_METRICS], cfg)
  mb = moe.summarize(sb[layers.MODEL_METRICS], scanned.cfg)
  assert sorted(ma) == sorted(mb) == ['moe_balance_loss', 'moe_dropped_fraction',
                                      'moe_expert_load_layer_1', 'moe_expert_load_layer_3',
                                      'moe_z_loss']
  for key in ma:
    np.testing.assert_allclose(float(mb[key]), float(ma[key]), rtol=1e-5)


class _Batches:
  def __init__(self, cfg):
    self.cfg, self.index = cfg, 0

  def __iter__(self):
    return self

  def __next__(self):
    b, t = self.cfg.train.batch_size, self.cfg.train.seq_len
    tokens = np.random.default_rng(self.index).integers(0, 40, (b, t + 1)).astype(np.int32)
    self.index += 1
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=np.ones((b, t), np.float32),
                positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                segment_ids=np.ones((b, t), np.int32))

  def get_state(self):
    return {'index': self.index}

  def set_state(self, state):
    self.index = state['index']


# ----------------------------------------------------------------------------------------------
# Expert parallelism on 8 simulated devices.


def _config(axes, shape) -> C.Config:
  """One MoE layer; the training loop below runs the expert-parallel config (same compiled step)."""
  return C.Config(seed=3, model=moe_cfg(num_layers=1), data=DataConfig(),
                  train=C.TrainConfig(batch_size=8, seq_len=16, steps=4, warmup_steps=0, lr=1e-3,
                                      log_every=2, eval_every=0, checkpoint_every=0,
                                      keep_checkpoints=1, eval_batches=1, tensorboard=False),
                  mesh=C.MeshConfig(axes=axes, shape=shape))


EXPERT_PARALLEL = _config(('data', 'expert'), (2, 4))


def test_expert_parallel_step_equals_the_single_device_step():
  sharded = step.make_trainer(EXPERT_PARALLEL)
  one = _config(('data',), (1,))
  single = step.make_trainer(one, mesh=sharding.make_mesh(one.mesh, devices=jax.devices()[:1]))
  specs = jax.tree.map(lambda s: tuple(s.spec), sharded.state_sharding.params)['layer_0']['ffn']
  assert specs['wi'] == ('expert', None, None) and specs['wo'] == ('expert', None, None)
  assert specs['router'] == (None, None)
  assert tuple(sharded.batch_sharding.spec) == (('data', 'expert'), None)   # data × expert
  state8, state1 = sharded.init_state(), single.init_state()
  wi = state8.params['layer_0']['ffn']['wi']
  assert wi.shape == (4, 32, 48) and wi.addressable_shards[0].data.shape == (1, 32, 48)
  assert len({s.device for s in wi.addressable_shards}) == 8
  batch = {k: v for k, v in _Batches(one).__next__().items()}
  batch8 = sharding.global_batch(batch, sharded.batch_sharding)
  hlo = sharded.train_step.lower(sharded.abstract_state(), batch8).compile().as_text()
  assert 'lcr_cpu_flash' not in hlo   # auto: under 8 devices not the unpartitioned CPU kernel
  # GShard's all-to-all moves each device's slots to their expert's device and back (and again
  # in the backward pass); the expert kernels' gradients are summed over 'data' only, per expert.
  assert hlo.count(' all-to-all(') >= 2
  lines = hlo.splitlines()
  assert any('all-reduce(' in line and 'f32[1,32,48]' in line for line in lines)
  assert not any('all-gather(' in line and 'f32[4,32,48]' in line for line in lines)
  initial = jax.device_get(state1.params)
  state8, m8 = sharded.train_step(state8, batch8)   # compiled above (XLA's cache)
  state1, m1 = single.train_step(state1, sharding.global_batch(batch, single.batch_sharding))
  for name in ('loss', 'aux_loss', 'grad_norm', 'moe_dropped_fraction', 'moe_expert_load_layer_0'):
    np.testing.assert_allclose(float(m8[name]), float(m1[name]), rtol=1e-5)
  assert float(m1['moe_dropped_fraction']) > 0
  # Adam divides by √v: where a gradient is nearly 0, summation order moves its update by up to a
  # fraction of lr (1e-3); everywhere else the parameters agree to float32 precision.
  p8, p1 = jax.device_get(state8.params), jax.device_get(state1.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), p8, p1)
  close = [np.mean(np.isclose(a, b, rtol=1e-5, atol=1e-6))
           for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1))]
  assert min(close) > 0.99
  moved = p1['layer_0']['ffn']['router'] - initial['layer_0']['ffn']['router']
  assert np.abs(moved).max() > 1e-4


def test_training_logs_the_moe_metrics_and_resumes_only_with_the_same_experts(tmp_path):
  cfg = EXPERT_PARALLEL   # the training loop on the expert-parallel mesh
  data = train.Data(vocab_size=40, train=_Batches(cfg), validation=lambda: [next(_Batches(cfg))])
  train.train(cfg, str(tmp_path), data)
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 4]
  for r in records:
    assert {'aux_loss', 'moe_balance_loss', 'moe_z_loss', 'moe_dropped_fraction',
            'moe_expert_load_layer_0'} <= set(r)
    assert 0.9 < r['moe_balance_loss'] < 4 and 0 <= r['moe_dropped_fraction'] < 1
    assert 1.0 <= r['moe_expert_load_layer_0'] <= 4.0
    assert r['aux_loss'] == pytest.approx(1e-2 * r['moe_balance_loss'] + 1e-3 * r['moe_z_loss'],
                                          rel=1e-5)
  with open(tmp_path / 'config.json') as f:
    assert C.from_config_dict(json.load(f)) == cfg
  more = dataclasses.replace(cfg, model=moe_cfg(num_layers=1, moe=C.MoeConfig(num_experts=8)))
  with pytest.raises(checkpoint.CheckpointError, match=r'model\.moe\.num_experts=4'):
    train.train(more, str(tmp_path), data)


# ----------------------------------------------------------------------------------------------
# Config: one error naming the field; overrides; study variants.


@pytest.mark.parametrize('model, message', [
    (dict(ffn='moe', moe=dict(num_experts=4, top_k=5)), r'model\.moe\.top_k=5 .*\[1, .*=4\]'),
    (dict(ffn='moe', moe=dict(capacity_factor=-0.5)), r'model\.moe\.capacity_factor=-0\.5'),
    (dict(moe=dict(num_experts=4)), r"model\.moe\.num_experts=4 .*unless model\.ffn='moe'"),
    (dict(ffn='swiglu', moe=dict(jitter=0.1)),
     r"model\.moe\.jitter=0\.1 .*unless model\.ffn='moe'"),
    (dict(ffn='moe', moe=dict(top_k=1)), r'model\.moe\.renormalize=True .*no gradient'),
    (dict(ffn='moe', moe=dict(every=3)), r'model\.moe\.every=3 .*num_layers=2'),
    (dict(ffn='moe', num_layers=3, scan_layers=True, moe=dict(every=2)), r'model\.moe\.every=2'),
    (dict(ffn='moe', moe=dict(expert_ffn='moe')), r"model\.moe\.expert_ffn='moe'"),
    (dict(ffn='moe', moe=dict(nope=1)), r'model\.moe\.nope does not exist'),
    (dict(norm_placement='deep'), r"model\.norm_placement='deep'"),
])
def test_bad_moe_values_name_the_field(model, message):
  with pytest.raises(C.ConfigError, match=message):
    C.from_config_dict({'model': model})


def test_overrides_reach_the_nested_moe_section():
  cfg = cli.load('configs/lm.py:smoke', ['model.ffn=moe', 'model.moe.num_experts=4',
                                          'model.moe.top_k=1', 'model.moe.renormalize=false',
                                          'model.moe.capacity_factor=-1', 'model.moe.every=2'])
  assert cfg.model.moe == C.MoeConfig(num_experts=4, top_k=1, renormalize=False,
                                      capacity_factor=-1.0, every=2)
  assert C.from_config_dict(json.loads(json.dumps(C.to_dict(cfg)))) == cfg
  with pytest.raises(C.ConfigError, match=r'config field model\.moe\.topk does not exist'):
    cli.load('configs/lm.py:smoke', ['model.moe.topk=1'])


def test_the_ffn_registry_and_the_config_agree():
  assert set(layers.FFNS) == set(C.FFNS) and layers.FFNS['moe'] is moe.MoeFfn
  assert set(C.DENSE_FFNS) == set(layers.ACTIVATIONS)


def test_dropless_values_and_the_expert_axis_check():
  assert C.MoeConfig(capacity_factor=0.0).dropless and C.MoeConfig(capacity_factor=-1.0).dropless
  cfg = _config(('data', 'expert'), (2, 4))
  bad = dataclasses.replace(cfg, model=moe_cfg(moe=C.MoeConfig(num_experts=6)))
  with pytest.raises(C.ConfigError, match=r'model\.moe\.num_experts=6 .*expert-parallel size 4'):
    step.make_trainer(bad)
  # Meshes without an 'expert' axis drop it from the rules.
  assert C.MeshConfig().axes_of('batch') == ('data', 'fsdp')
  assert cfg.mesh.axes_of('batch') == ('data', 'expert')
  assert cfg.mesh.axes_of('expert') == ('expert',)


def test_moe_and_deepnorm_are_study_variants(tmp_path):
  config = cli.load_config_dict('configs/extrapolation.py:smoke')
  config.study.variants = 'rope,moe,deepnorm'
  config.study.overrides = {
      'moe': {'model': {'pos': 'rope', 'ffn': 'moe', 'moe': {'num_experts': 4, 'top_k': 1,
                                                            'renormalize': False}}},
      'deepnorm': {'model': {'pos': 'rope', 'norm_placement': 'deepnorm'}}}
  values, spec = study.split_config(config)
  moe_variant = study.variant_config(values, spec, 'moe')
  assert moe_variant.model.ffn == 'moe' and moe_variant.model.pos == 'rope'
  assert moe_variant.model.moe == C.MoeConfig(num_experts=4, top_k=1, renormalize=False)
  assert study.variant_config(values, spec, 'deepnorm').model.norm_placement == 'deepnorm'
  assert study.variant_config(values, spec, 'rope').model.ffn == 'mlp'
