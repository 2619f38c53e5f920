"""The decoder LM: causality, packing, GQA/MQA, layer options, against invariants and NumPy."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import attention, config
from lcr.config import ModelConfig
from lcr.model import TransformerLM

TINY = dict(vocab_size=37, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_len=64)


def build(**overrides):
  cfg = ModelConfig(**{**TINY, **overrides})
  model = TransformerLM(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)['params']
  return model, params


def logits(model, params, tokens, positions=None, segments=None):
  return np.asarray(jax.jit(model.apply)({'params': params}, tokens, positions, segments))


@pytest.fixture(scope='module', params=config.POSITIONAL_ENCODINGS)
def every_pos(request):
  return request.param, *build(pos=request.param)


def test_changing_future_tokens_never_changes_past_logits(every_pos):
  pos, model, params = every_pos
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 37, size=(2, 19))
  changed = tokens.copy()
  t = 11
  changed[:, t + 1:] = rng.integers(0, 37, size=(2, 19 - t - 1))
  a, b = logits(model, params, tokens), logits(model, params, changed)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_packed_documents_never_attend_across(every_pos):
  """A document packed after another gives the logits it gets alone (positions restart)."""
  pos, model, params = every_pos
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, 37, size=7), rng.integers(0, 37, size=10)
  packed = np.concatenate([doc_a, doc_b])[None]
  positions = np.concatenate([np.arange(7), np.arange(10)])[None]
  segments = np.array([[1] * 7 + [2] * 10])
  together = logits(model, params, packed, positions, segments)
  np.testing.assert_allclose(together[:, 7:], logits(model, params, doc_b[None]), atol=1e-5)
  np.testing.assert_allclose(together[:, :7], logits(model, params, doc_a[None]), atol=1e-5)


def reference_attention(q, k, v, mask, bias=None):
  """Float64 NumPy softmax(q kᵀ/√d + bias) v with K/V heads repeated for each query group."""
  h, kv = q.shape[2], k.shape[2]
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  s = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    s = s + bias
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhts,bshd->bthd', p, v)


@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (6, 2), (3, 1), (5, 5)])
def test_xla_attention_matches_numpy_for_mha_gqa_mqa(heads, kv_heads):
  rng = np.random.default_rng(heads * 10 + kv_heads)
  b, t, d = 2, 13, 8
  q = rng.normal(size=(b, t, heads, d))
  k, v = rng.normal(size=(2, b, t, kv_heads, d))
  positions = np.broadcast_to(np.arange(t), (b, t))
  segments = np.array([[1] * 6 + [2] * 7, [1] * 13])
  slopes = rng.uniform(0.1, 1.0, size=heads)

  def bias_fn(qp, kp):
    return -slopes[None, :, None, None] * (qp[:, :, None] - kp[:, None, :])[:, None]

  for window in (0, 4):
    got = attention.attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), q_pos=positions,
                           k_pos=positions, q_segments=segments, k_segments=segments,
                           bias_fn=bias_fn, window=window)
    dist = positions[:, :, None] - positions[:, None, :]
    mask = (dist >= 0) & (segments[:, :, None] == segments[:, None, :])
    if window:
      mask &= dist < window
    want = reference_attention(q, k, v, mask, bias_fn(positions, positions))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_gqa_with_as_many_kv_heads_as_heads_is_mha():
  _, params = build(num_kv_heads=4)
  kernel = params['layer_0']['attention']['key']['kernel']
  assert kernel.value.shape == (32, 4, 8)


def test_mqa_has_one_key_value_head():
  model, params = build(num_kv_heads=1)
  attn = params['layer_0']['attention']
  assert attn['key']['kernel'].value.shape == (32, 1, 8)
  assert attn['value']['kernel'].value.shape == (32, 1, 8)
  assert attn['query']['kernel'].value.shape == (32, 4, 8)
  assert logits(model, params, np.zeros((2, 5), np.int32)).shape == (2, 5, 37)


def test_every_parameter_has_logical_axis_names():
  _, params = build(pos='t5', ffn='swiglu', tie_embeddings=False)
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


def unbox(tree):
  return nn.meta.unbox(tree)


def test_scanned_layers_equal_unrolled_layers():
  """An invariant: scanning the layers changes how they run, not what they compute."""
  model, params = build(pos='alibi', num_layers=3)
  scanned, _ = build(pos='alibi', num_layers=3, scan_layers=True, remat=True)
  plain = unbox(params)
  stacked = {k: v for k, v in plain.items() if not k.startswith('layer_')}
  stacked['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[plain[f'layer_{i}'] for i in range(3)])
  tokens = np.random.default_rng(3).integers(0, 37, size=(2, 12))
  np.testing.assert_allclose(logits(scanned, stacked, tokens), logits(model, plain, tokens),
                             atol=1e-5)


def test_remat_changes_neither_loss_nor_gradient():
  """An invariant: rematerialisation recomputes activations, so gradients stay the same."""
  model, params = build(pos='rope', num_layers=1)
  remat_model, _ = build(pos='rope', num_layers=1, remat=True)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 37, size=(2, 12)))

  def loss(m, p):
    return jnp.mean(jax.nn.log_softmax(m.apply({'params': p}, tokens))[..., 0])
  g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(unbox(params))
  g2 = jax.jit(jax.grad(lambda p: loss(remat_model, p)))(unbox(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize('ffn', ['mlp', 'swiglu', 'geglu'])
def test_ffn_matches_numpy(ffn):
  from lcr import layers
  cfg = ModelConfig(**{**TINY, 'ffn': ffn, 'ffn_dim': 24})
  module = layers.FFNS[ffn](cfg)
  x = np.random.default_rng(5).normal(size=(1, 3, 32))
  p = unbox(module.init(jax.random.PRNGKey(1), jnp.asarray(x, jnp.float32))['params'])
  gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  if ffn == 'mlp':
    want = gelu(x @ p['wi']['kernel']) @ p['wo']['kernel']
  else:
    act = (lambda z: z / (1 + np.exp(-z))) if ffn == 'swiglu' else gelu
    want = (act(x @ p['wi_gate']['kernel']) * (x @ p['wi_up']['kernel'])) @ p['wo']['kernel']
  got = module.apply({'params': p}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


@pytest.mark.parametrize('overrides', [
    dict(norm='rmsnorm', norm_placement='post', ffn='geglu'),
    dict(pos='sinusoidal', pos_combine='concat', pos_dim=8),
    dict(pos='learned', pos_combine='concat', tie_embeddings=False),
    dict(pos='xpos', dtype='bfloat16', dropout=0.1),
])
def test_layer_options_build_and_run(overrides):
  model, params = build(**overrides)
  out = logits(model, params, np.ones((2, 9), np.int32))
  assert out.shape == (2, 9, 37) and out.dtype == np.float32 and np.all(np.isfinite(out))


def test_dropout_is_active_only_when_not_deterministic():
  model, params = build(dropout=0.5)
  tokens = jnp.ones((1, 6), jnp.int32)
  apply = jax.jit(model.apply, static_argnames='deterministic')
  a = apply({'params': params}, tokens, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  b = apply({'params': params}, tokens, deterministic=False, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(a, b)
  np.testing.assert_allclose(apply({'params': params}, tokens), apply({'params': params}, tokens))


def test_learned_positions_past_the_table_fail_before_compiling():
  model, params = build(pos='learned', max_len=16)
  with pytest.raises(config.ConfigError, match='model.max_len=16'):
    model.apply({'params': params}, jnp.zeros((1, 17), jnp.int32))


def test_dynamic_ntk_uses_the_base_of_the_length_each_query_reached():
  """One layer: a query at p < L sees plain RoPE; a query at p ≥ L the static NTK base of α(p + 1)
  over tokens 0..p (every key rotated with the query's own base, as in generation)."""
  common = dict(num_layers=1, pos='rope', rope_original_length=8)
  dyn_model, params = build(rope_scaling='dynamic_ntk', rope_factor=2.0, **common)
  plain_model, _ = build(**common | {'rope_original_length': 0})
  tokens = np.random.default_rng(6).integers(0, 37, size=(1, 24))
  dyn = logits(dyn_model, params, tokens)
  np.testing.assert_allclose(dyn[:, :8], logits(plain_model, params, tokens)[:, :8], atol=1e-5)
  for p in (8, 23):
    alpha = 2.0 * (p + 1) / 8 - 1.0
    static_model, _ = build(rope_scaling='ntk', rope_factor=alpha, **common)
    np.testing.assert_allclose(dyn[:, p], logits(static_model, params, tokens[:, :p + 1])[:, -1],
                               atol=1e-5)


def test_rope_scalings_share_parameters_and_agree_within_the_training_length():
  """An invariant: at factor 1 dynamic NTK and YaRN are plain RoPE (their formulas are checked
  against NumPy in test_positional)."""
  model, params = build(pos='rope')
  tokens = np.random.default_rng(7).integers(0, 37, size=(1, 8))
  base = logits(model, params, tokens)
  for scaling in ('dynamic_ntk', 'yarn'):
    cfg = dataclasses.replace(model.cfg, rope_scaling=scaling, rope_factor=1.0,
                              rope_original_length=8)
    np.testing.assert_allclose(logits(TransformerLM(cfg), params, tokens), base, atol=1e-5)
