"""Context parallelism: the load-balancing permutation, ring and all-gather attention against a
dense reference written here, a sequence-sharded train step against the one-device step, and
per-device memory of the compiled step (8 simulated devices: sequence 4 × data 2, and sequence 8)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcr import attention, positional, sharding, step
from lcr import config as C
from lcr.attention import context_parallel as cp
from lcr.data.config import DataConfig

B, T, H, KV, D = 2, 32, 4, 2, 8
RULES = (('batch', 'data'), ('length', 'sequence'))


# ----------------------------------------------------------------------------------------------
# The permutation and its inverse, on their own.


def test_balance_order_gives_device_r_chunks_r_and_2cp_minus_1_minus_r():
  # 8 tokens, 2 devices: chunks of 2; device 0 holds chunks 0 and 3, device 1 chunks 1 and 2.
  np.testing.assert_array_equal(cp.balance_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  # 8 tokens, 4 devices: chunks of 1; device r holds tokens r and 7 − r.
  np.testing.assert_array_equal(cp.balance_order(8, 4), [0, 7, 1, 6, 2, 5, 3, 4])
  np.testing.assert_array_equal(cp.balance_order(6, 1), np.arange(6))


def test_restore_order_is_the_inverse_written_out_by_hand():
  # balanced = row[[0, 1, 6, 7, 2, 3, 4, 5]], so row[j] sits at balanced index [0, 1, 4, 5, 6, 7, 2, 3][j].
  np.testing.assert_array_equal(cp.restore_order(8, 2), [0, 1, 4, 5, 6, 7, 2, 3])
  np.testing.assert_array_equal(cp.restore_order(8, 4), [0, 2, 4, 6, 7, 5, 3, 1])
  # Not an involution: using the permutation as its own inverse would scramble the row.
  assert not np.array_equal(cp.balance_order(8, 2)[cp.balance_order(8, 2)], np.arange(8))


@pytest.mark.parametrize('length, devices', [(16, 2), (24, 4), (64, 8)])
def test_balance_then_unbalance_restores_the_row(length, devices):
  x = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (3, length, 2)))
  balanced = cp.balance(x, devices)
  assert not np.array_equal(balanced, x)
  np.testing.assert_array_equal(cp.unbalance(balanced, devices), x)
  np.testing.assert_array_equal(cp.balance(cp.unbalance(x, devices), devices), x)
  # Causal attention: each device's share of positions holds the same number of visible
  # (query, key) pairs, Σ (p + 1) — the point of the permutation.
  shares = np.asarray(cp.balance(jnp.arange(length)[None], devices)).reshape(devices, -1)
  assert len({int(np.sum(share + 1)) for share in shares}) == 1, shares


def test_balance_needs_2cp_equal_chunks():
  with pytest.raises(ValueError, match='2·4 equal chunks'):
    cp.balance_order(12, 4)


# ----------------------------------------------------------------------------------------------
# Attention across devices against a dense reference written here.


def _reference(q, k, v, q_pos, k_pos, seg, window, slopes):
  """softmax(q·kᵀ/√D − m_h·(p − r)) v over keys r ≤ p of the same document (and p − r < window)."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, k, precision='highest') / np.sqrt(q.shape[-1])
  dist = q_pos[:, None, :, None] - k_pos[:, None, None, :]
  if slopes is not None:
    logits = logits - slopes[None, :, None, None] * dist
  ok = (dist >= 0) & (seg[:, None, :, None] == seg[:, None, None, :])
  if window:
    ok &= dist < window
  probs = jax.nn.softmax(jnp.where(ok, logits, -1e30), axis=-1)
  return jnp.einsum('bhts,bshd->bthd', probs, v, precision='highest')


def _rope(x, pos):
  """RoFormer rotation in the rotate-half layout, θ_i = 10000^(−2i/D)."""
  half = x.shape[-1] // 2
  angles = pos[:, :, None, None] * (10000.0 ** (-np.arange(half) / half))[None, None, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * jnp.cos(angles) - x2 * jnp.sin(angles),
                          x2 * jnp.cos(angles) + x1 * jnp.sin(angles)], axis=-1)


def _inputs():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(B, T, H, D)).astype(np.float32)
  k, v = (rng.normal(size=(B, T, KV, D)).astype(np.float32) for _ in range(2))
  # Row 1 packs two documents: positions restart and the segment id changes at token 11.
  pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  seg = np.ones((B, T), np.int32)
  pos[1, 11:] -= 11
  seg[1, 11:] = 2
  return q, k, v, pos, seg


CASES = {   # name: (rope, window, alibi)
    'causal_rope_packed': (True, 0, False),
    'sliding_alibi_packed': (False, 6, True),
}


def _loss(attend_fn, rope, q, k, v, pos):
  if rope:
    q, k = _rope(q, pos), _rope(k, pos)
  out = attend_fn(q, k, v)
  return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))), out


def _sharded_value_and_grads(method, shape, case, q, k, v, pos, seg):
  rope, window, alibi = CASES[case]
  mesh = Mesh(np.asarray(jax.devices()).reshape(shape), ('data', 'sequence'))
  devices = shape[1]
  mask = attention.MaskSpec('sliding', window=window) if window else attention.MaskSpec()

  def fn(q, k, v, pos, seg):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
      def attend(q, k, v):
        # Balanced order, as the trainer feeds it: positions and segment ids travel along.
        q, k, v, p, s = (cp.balance(x, devices) for x in (q, k, v, pos, seg))
        out = attention.attend(q, k, v, q_pos=p, k_pos=p, q_segments=s, k_segments=s,
                               mask=mask, chunk=4, context_parallel=method,
                               bias_fn=positional.alibi_bias(H) if alibi else None)
        return cp.unbalance(out, devices)
      (value, out), grads = jax.value_and_grad(
          lambda *a: _loss(attend, rope, *a, pos), argnums=(0, 1, 2), has_aux=True)(q, k, v)
      return value, out, grads

  spec = NamedSharding(mesh, PartitionSpec('data', 'sequence'))
  args = jax.device_put((q, k, v, pos, seg), spec)
  return jax.jit(fn)(*args)


@pytest.mark.parametrize('method, shape, case', [
    ('ring', (2, 4), 'causal_rope_packed'),
    ('ring', (2, 4), 'sliding_alibi_packed'),
    ('ring', (1, 8), 'causal_rope_packed'),
    ('all_gather', (2, 4), 'causal_rope_packed'),
    ('all_gather', (1, 8), 'sliding_alibi_packed'),
])
def test_sharded_attention_and_gradients_equal_the_dense_reference(method, shape, case):
  q, k, v, pos, seg = _inputs()
  rope, window, alibi = CASES[case]
  slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H) if alibi else None   # Press et al. §3, H = 4
  ref_attend = lambda q, k, v: _reference(q, k, v, pos, pos, seg, window, slopes)
  (ref_value, ref_out), ref_grads = jax.value_and_grad(
      lambda *a: _loss(ref_attend, rope, *a, pos), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  value, out, grads = _sharded_value_and_grads(method, shape, case, q, k, v, pos, seg)
  np.testing.assert_allclose(out, ref_out, atol=2e-5)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for name, g, r in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=5e-5, err_msg=f'd{name}')


# ----------------------------------------------------------------------------------------------
# The train step with the sequence sharded equals the one-device step.


def _config(axes, shape, **model):
  model = dict(dict(vocab_size=64, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2,
                    attention_chunk=4, pos='t5'), **model)
  return C.Config(
      seed=5, model=C.ModelConfig(**model), data=DataConfig(),
      train=C.TrainConfig(batch_size=4, seq_len=T, steps=10, warmup_steps=0, lr=1e-2),
      mesh=C.MeshConfig(axes=axes, shape=shape))


def _batch(cfg):
  rng = np.random.default_rng(2)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  cut = rng.integers(1, t, b)[:, None]
  cols = np.arange(t)[None, :]
  weights = np.ones((b, t), np.float32)
  weights[0, -5:] = 0.0
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=weights,
              positions=np.where(cols < cut, cols, cols - cut).astype(np.int32),
              segment_ids=np.where(cols < cut, 1, 2).astype(np.int32))


def _two_steps(trainer, batch):
  state, history = trainer.init_state(), []
  batch = sharding.global_batch(batch, trainer.batch_sharding)
  for _ in range(2):   # the second step runs on parameters the first one changed
    state, m = trainer.train_step(state, batch)
    history.append({k: float(m[k]) for k in ('loss', 'grad_norm')})
  return history, jax.device_get(state.params), batch


@pytest.fixture(scope='module')
def one_device_steps():
  cfg = _config(('data',), (1,))
  return _two_steps(step.make_trainer(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1])),
                    _batch(cfg))


# T5's learned logit bias (shared by the layers): its gradient comes round the ring / back
# through the all-gather; the batch packs two documents per row and has a padded tail.
@pytest.mark.parametrize('method, shape', [('ring', (2, 4)), ('all_gather', (1, 8))])
def test_sequence_sharded_train_step_equals_the_one_device_step(method, shape, one_device_steps):
  cfg = _config(('data', 'sequence'), shape, context_parallel=method)
  trainer = step.make_trainer(cfg)
  assert dict(trainer.mesh.shape) == {'data': shape[0], 'sequence': shape[1]}
  history, params, batch = _two_steps(trainer, _batch(cfg))
  assert batch['inputs'].addressable_shards[0].data.shape == (4 // shape[0], T // shape[1])
  # Wiring: the step gathers the batch into balanced order, and attention runs the method's
  # collective (XLA alone would also compute the right numbers from a sharded sequence).
  text = trainer.train_step.lower(trainer.abstract_state(), batch).as_text()
  assert f'dense<[{", ".join(map(str, cp.balance_order(T, shape[1])))}]>' in text
  assert {'ring': 'stablehlo.collective_permute', 'all_gather': 'stablehlo.all_gather'}[method] in text
  ref_history, ref_params, _ = one_device_steps
  for got, ref in zip(history, ref_history):
    for name in ('loss', 'grad_norm'):
      np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, err_msg=name)
  assert history[1]['loss'] < history[0]['loss']
  # Adam's second update divides by √v of small gradients: allow 1 % of the step size (lr 1e-2).
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Memory of the compiled step, per device.


def _step_memory(cfg: C.Config, devices) -> int:
  trainer = step.make_trainer(cfg, mesh=sharding.make_mesh(cfg.mesh, devices))
  b, t = cfg.train.batch_size, cfg.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == 'weights' else jnp.int32,
                                   sharding=trainer.batch_sharding)
           for k in ('inputs', 'targets', 'weights', 'positions', 'segment_ids')}
  compiled = trainer.train_step.lower(trainer.abstract_state(), batch).compile()
  assert 'ynn_fusion' not in compiled.as_text()   # step.CPU_COMPILER_OPTIONS reached XLA
  return compiled.memory_analysis().temp_size_in_bytes


# Long and narrow, so activations (which shard) outweigh parameters and optimizer state (which do
# not); `chunked` on one device, so neither side holds T × T logits.
MEMORY_MODEL = dict(vocab_size=16, num_layers=1, d_model=16, num_heads=2, attention_chunk=128,
                    attention_backend='chunked', pos='rope')


def _long_config(method: str, devices: int) -> C.Config:
  return dataclasses.replace(
      _config(('sequence',), (devices,), **MEMORY_MODEL, context_parallel=method),
      train=C.TrainConfig(batch_size=1, seq_len=4096, steps=10, warmup_steps=0))


@pytest.fixture(scope='module')
def one_device_memory():
  return _step_memory(_long_config('none', 1), jax.devices()[:1])


def test_ring_step_memory_per_device_is_about_one_over_cp(one_device_memory):
  per_device = _step_memory(_long_config('ring', 8), jax.devices())
  assert 0.5 / 8 < per_device / one_device_memory < 1.5 / 8, (per_device, one_device_memory)


def test_all_gather_step_memory_holds_the_whole_keys_and_values(one_device_memory):
  # Everything but attention is sharded; each device holds all keys and values (and their
  # gradients before the reduce-scatter), so it saves less than the ring.
  per_device = _step_memory(_long_config('all_gather', 8), jax.devices())
  assert 1.5 / 8 < per_device / one_device_memory < 0.5, (per_device, one_device_memory)


# ----------------------------------------------------------------------------------------------
# Configuration.


def test_context_parallel_names_are_the_methods_plus_none():
  assert set(C.CONTEXT_PARALLEL) == {'none', *cp.METHODS}


def test_rules_drop_the_sequence_axis_when_the_mesh_has_none():
  assert dict(C.MeshConfig().active_rules)['length'] is None
  mesh = C.MeshConfig(axes=('data', 'sequence'), shape=(2, 4))
  assert mesh.axes_of('length') == ('sequence',) and mesh.axes_of('batch') == ('data',)
  with pytest.raises(C.ConfigError, match="names mesh axis 'sequense'"):
    C.MeshConfig(rules=(('length', 'sequense'),))


@pytest.mark.parametrize('model, seq_len, field', [
    (dict(context_parallel='none'), T, 'model.context_parallel'),   # sharded but no method
    (dict(context_parallel='ring'), 36, 'train.seq_len'),           # not 2·4 equal chunks
])
def test_a_config_that_cannot_shard_the_sequence_fails_before_compiling(model, seq_len, field):
  cfg = dataclasses.replace(_config(('data', 'sequence'), (2, 4), **model),
                            train=C.TrainConfig(batch_size=4, seq_len=seq_len))
  with pytest.raises(C.ConfigError, match=field.replace('.', r'\.')):
    step.make_trainer(cfg)


@pytest.mark.parametrize('model, message', [
    (dict(context_parallel='ringg'), "model.context_parallel='ringg' is invalid: allowed values"),
    (dict(context_parallel='ring', pos='rope', rope_scaling='dynamic_ntk', rope_factor=2.0,
          rope_original_length=16), "model.context_parallel='ring' is invalid: rope_scaling"),
])
def test_bad_context_parallel_values_name_the_field(model, message):
  with pytest.raises(C.ConfigError, match=message):
    C.ModelConfig(**model)
