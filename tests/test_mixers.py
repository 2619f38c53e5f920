"""Token mixers (lcr.mixers: linear, retention, ssm) against their papers' recurrences in NumPy.

References, all recomputed here in float64 NumPy, one token at a time:
  * linear attention: S_i = S_{i−1} + φ(k_i)v_iᵀ, z_i = z_{i−1} + φ(k_i), out = φ(q_i)S_i / φ(q_i)z_i,
    φ = elu + 1 (Katharopoulos et al. 2020);
  * retention: S_n = γ S_{n−1} + k_nᵀv_n, out = q_n S_n (RetNet eq. 6), γ = 1 − 2^(−5−h) written out
    by hand, and the whole multi-scale retention block (RoPE rotation, d^(−1/2), GroupNorm per
    head, swish gate) from its parameters;
  * the selective SSM: h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t, y_t = C_t·h_t + D x_t, and the whole
    Mamba block (convolution, Δ's softplus, gate) from its parameters.
Each lcr form — parallel (one chunk), recurrent (chunks of one token) and chunkwise — is compared
with the recurrence; documents packed in a row restart it.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr.config import ModelConfig
from lcr.mixers import linear, retention, ssm, state

RNG = np.random.default_rng(0)
B, T, H, D = 2, 11, 3, 4
# Row 0 is one document; row 1 packs two (positions restart at 0) and ends in padding.
DOCS = np.array([[1] * T, [1] * 4 + [2] * 5 + [0] * 2])
POS = np.array([np.arange(T), np.r_[np.arange(4), np.arange(5), [0, 0]]])


def tokens():
  return state.tokens(jnp.asarray(POS), jnp.asarray(DOCS))


def elu1(x):
  return np.where(x > 0, x + 1.0, np.exp(x))


def assert_close(got, want, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * np.abs(want).max())


def by_document(fn, *arrays):
  """fn over each row's runs of one document (real tokens only); 0 at padding."""
  out = np.zeros(arrays[0].shape[:2] + fn(*(a[:1, :1] for a in arrays)).shape[2:])
  for b in range(DOCS.shape[0]):
    for doc in set(DOCS[b]) - {0}:
      idx = np.flatnonzero(DOCS[b] == doc)
      out[b, idx] = fn(*(a[b:b + 1, idx] for a in arrays))[0]
  return out


def numpy_linear(fq, fk, v):
  """Katharopoulos et al. 2020 §3.4 as an RNN, one token at a time."""
  b, t, h, d = fq.shape
  out = np.zeros((b, t, h, d))
  for i in range(b):
    s, z = np.zeros((h, d, d)), np.zeros((h, d))
    for n in range(t):
      s += np.einsum('hd,he->hde', fk[i, n], v[i, n])
      z += fk[i, n]
      out[i, n] = np.einsum('hd,hde->he', fq[i, n], s) / np.einsum('hd,hd->h', fq[i, n], z)[:, None]
  return out


def numpy_retention(q, k, v, gammas):
  """RetNet eq. 6: S_n = γ S_{n−1} + k_nᵀ v_n, out_n = q_n S_n, per head."""
  b, t, h, d = q.shape
  out = np.zeros((b, t, h, d))
  for i in range(b):
    s = np.zeros((h, d, d))
    for n in range(t):
      s = gammas[:, None, None] * s + np.einsum('hd,he->hde', k[i, n], v[i, n])
      out[i, n] = np.einsum('hd,hde->he', q[i, n], s)
  return out


def run(chunk_fn, start, arrays, chunk):
  return jax.jit(lambda *a: state.over_chunks(chunk_fn, start, a, tokens(), chunk))(*arrays)


def empty(**shapes):
  return {name: jnp.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}


@pytest.mark.parametrize('chunk', [0, 1, 3], ids=['parallel', 'recurrent', 'chunkwise'])
def test_linear_attention_forms_equal_the_recurrence(chunk):
  q, k, v = RNG.normal(size=(3, B, T, H, D))
  start = empty(kv=((B, H, D, D), jnp.float32), normaliser=((B, H, D), jnp.float32),
                doc=((B,), jnp.int32))
  out, final = run(linear.linear_attention_chunk, start, (elu1(q), elu1(k), v), chunk)
  real = DOCS > 0
  assert_close(np.asarray(out)[real], by_document(numpy_linear, elu1(q), elu1(k), v)[real])
  # The state after the call holds each row's last document only: row 1's second document.
  assert_close(final['kv'][1], np.einsum('thd,the->hde', elu1(k)[1, 4:9], v[1, 4:9]))
  np.testing.assert_array_equal(np.asarray(final['doc']), [1, 2])


def test_retention_decays_are_the_papers():
  """γ = 1 − 2^(−5 − arange(0, h)) (Sun et al. 2023 §2.2), written out for h = 4."""
  np.testing.assert_array_equal(retention.decays(4), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128,
                                                      1 - 1 / 256])


@pytest.mark.parametrize('chunk', [0, 1, 4], ids=['parallel', 'recurrent', 'chunkwise'])
def test_retention_forms_equal_the_recurrence(chunk):
  q, k, v = RNG.normal(size=(3, B, T, H, D))
  gammas = retention.decays(H)
  start = empty(kv=((B, H, D, D), jnp.float32), pos=((B,), jnp.int32), doc=((B,), jnp.int32))
  out, _ = run(lambda st, *a: retention.retention_chunk(
      st, *a, log_gamma=jnp.log(jnp.asarray(gammas, jnp.float32))), start, (q, k, v), chunk)
  real = DOCS > 0
  want = by_document(lambda *a: numpy_retention(*a, gammas), q, k, v)
  assert_close(np.asarray(out)[real], want[real])


def test_associative_scan_equals_the_sequential_recurrence():
  a = RNG.uniform(0.2, 1.0, size=(2, 13, 3, 5))
  b, h0 = RNG.normal(size=(2, 13, 3, 5)), RNG.normal(size=(2, 3, 5))
  want = np.zeros_like(b)
  h = h0.copy()
  for t in range(13):
    h = a[:, t] * h + b[:, t]
    want[:, t] = h
  assert_close(jax.jit(ssm.scan)(a, b, h0), want)


# ----------------------------------------------------------------------------------------------
# Whole mixers from their parameters.

CFG = ModelConfig(vocab_size=11, num_layers=1, d_model=16, num_heads=4, pos='none')


def module_params(module, x, seed):
  """Random parameters of the module's shapes (larger than its initialiser's)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.asarray(POS),
                                              jnp.asarray(DOCS)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: np.asarray(rng.normal(size=s.shape) * 0.5, np.float32),
                      nn.meta.unbox(shapes))


def apply(module, params, x, **kw):
  return np.asarray(jax.jit(lambda p, x: module.apply({'params': p}, x, jnp.asarray(POS),
                                                      jnp.asarray(DOCS), **kw))(params, x))


def rope(x, positions, base=10000.0):
  """RoFormer eq. 34, rotate-half layout: pairs (i, i + d/2) turn by p·base^(−2i/d)."""
  d = x.shape[-1]
  angle = positions[..., None, None] * base ** (-np.arange(0, d, 2) / d)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def heads(x, kernel):
  return np.einsum('btd,dhk->bthk', x, kernel)


def test_multi_scale_retention_block_matches_numpy():
  cfg = dataclasses.replace(CFG, mixer='retention')
  module = retention.MultiScaleRetention(cfg)
  x = RNG.normal(size=(B, T, cfg.d_model)).astype(np.float32)
  p = module_params(module, x, seed=1)
  d = cfg.head_dim
  q = rope(heads(x, p['query']['kernel']), POS)
  k = rope(heads(x, p['key']['kernel']), POS) / math.sqrt(d)
  v = heads(x, p['value']['kernel'])
  ret = by_document(lambda *a: numpy_retention(*a, retention.decays(cfg.num_heads)), q, k, v)
  mean = ret.mean(-1, keepdims=True)
  normed = ((ret - mean) / np.sqrt(ret.var(-1, keepdims=True) + 1e-5)).reshape(B, T, -1)
  y = normed * p['norm_scale'] + p['norm_bias']
  g = x @ p['gate']['kernel']
  want = (g / (1 + np.exp(-g)) * y) @ p['out']['kernel']
  real = DOCS > 0
  assert_close(apply(module, p, x)[real], want[real], rtol=2e-5)


def numpy_mamba(p, x, cfg):
  """Mamba's S6 block (Gu & Dao 2023, Algorithm 2 and Fig. 3) for one document, step by step."""
  inner, n, w = cfg.ssm_expand * cfg.d_model, cfg.ssm_state, cfg.ssm_conv
  rank = math.ceil(cfg.d_model / 16)
  xz = x @ p['in_proj']['kernel']
  xi, z = xz[..., :inner], xz[..., inner:]
  t = x.shape[1]
  padded = np.concatenate([np.zeros((1, w - 1, inner)), xi], axis=1)
  conv = sum(p['conv_kernel'][i] * padded[:, i:i + t] for i in range(w)) + p['conv_bias']
  xc = conv / (1 + np.exp(-conv))
  dbc = xc @ p['x_proj']['kernel']
  dt = np.log1p(np.exp(dbc[..., :rank] @ p['dt_proj']['kernel'] + p['dt_proj']['bias']))
  b_in, c_out = dbc[..., rank:rank + n], dbc[..., rank + n:]
  a = -np.exp(p['A_log'])
  h = np.zeros((inner, n))
  y = np.zeros((1, t, inner))
  for s in range(t):
    h = np.exp(dt[0, s][:, None] * a) * h + (dt[0, s] * xc[0, s])[:, None] * b_in[0, s][None, :]
    y[0, s] = h @ c_out[0, s] + p['D'] * xc[0, s]
  return (y * z / (1 + np.exp(-z))) @ p['out_proj']['kernel']


def test_selective_ssm_block_matches_numpy():
  cfg = dataclasses.replace(CFG, mixer='ssm', ssm_state=5, ssm_expand=2, ssm_conv=3)
  module = ssm.SelectiveSSM(cfg)
  x = RNG.normal(size=(B, T, cfg.d_model)).astype(np.float32)
  p = module_params(module, x, seed=2)
  p['A_log'] = np.log(RNG.uniform(0.5, 2.0, size=p['A_log'].shape)).astype(np.float32)
  want = by_document(lambda xs: numpy_mamba(p, xs, cfg), x)
  real = DOCS > 0
  assert_close(apply(module, p, x)[real], want[real], rtol=2e-5)


def test_linear_attention_block_matches_numpy():
  cfg = dataclasses.replace(CFG, mixer='linear', mixer_chunk=4)
  module = linear.LinearAttention(cfg)
  x = RNG.normal(size=(B, T, cfg.d_model)).astype(np.float32)
  p = module_params(module, x, seed=3)
  fq, fk = elu1(heads(x, p['query']['kernel'])), elu1(heads(x, p['key']['kernel']))
  out = by_document(numpy_linear, fq, fk, heads(x, p['value']['kernel']))
  want = np.einsum('bthk,hkd->btd', out, p['out']['kernel'])
  real = DOCS > 0
  assert_close(apply(module, p, x)[real], want[real])


def test_mamba_initialisation_follows_the_paper():
  """A_log = log(1 … N) (S4D-real), D = 1, Δ = softplus(b_Δ) in [0.001, 0.1] at zero input."""
  cfg = dataclasses.replace(CFG, mixer='ssm')
  x = jnp.zeros((1, 4, cfg.d_model))
  p = ssm.SelectiveSSM(cfg).init(jax.random.key(3), x, jnp.zeros((1, 4), jnp.int32),
                                 jnp.ones((1, 4), jnp.int32))['params']
  p = nn.meta.unbox(p)
  inner = 2 * cfg.d_model
  np.testing.assert_allclose(p['A_log'], np.log(np.tile(np.arange(1, 17), (inner, 1))), rtol=1e-6)
  np.testing.assert_array_equal(p['D'], np.ones(inner))
  dt = np.log1p(np.exp(np.asarray(p['dt_proj']['bias'], np.float64)))
  assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
  assert p['dt_proj']['kernel'].shape == (1, inner)   # rank ceil(16 / 16)
