"""Positional encodings against their papers' formulas, recomputed independently in NumPy."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import config, positional
from lcr.config import ModelConfig


# ----------------------------------------------------------------------------------------------
# ALiBi slopes.

def reference_alibi_slopes(n):
  """Press et al. 2022 §3: for a power of two, 2^(-8k/n), k = 1..n; otherwise the p = 2^floor(log2 n)
  slopes followed by the odd terms of the 2p sequence, 2^(-8(2k-1)/(2p)), k = 1..n-p."""
  p = 1
  while p * 2 <= n:
    p *= 2
  ours = [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]
  extra = [2.0 ** (-8.0 * (2 * k - 1) / (2 * p)) for k in range(1, n - p + 1)]
  return np.array(ours + extra)


@pytest.mark.parametrize('n', range(1, 65))
def test_alibi_slopes_follow_the_paper_rule(n):
  slopes = positional.alibi_slopes(n)
  assert slopes.shape == (n,)
  np.testing.assert_allclose(slopes, reference_alibi_slopes(n), rtol=1e-12)


def test_alibi_slopes_golden_values():
  np.testing.assert_allclose(positional.alibi_slopes(8), [1 / 2 ** k for k in range(1, 9)])
  twelve = [2 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
  np.testing.assert_allclose(positional.alibi_slopes(12), twelve)


def test_alibi_bias_is_minus_slope_times_distance():
  q_pos = jnp.array([[0, 3, 7]])
  k_pos = jnp.array([[0, 2, 5, 7]])
  bias = np.asarray(positional.alibi_bias(3)(q_pos, k_pos))
  slopes = reference_alibi_slopes(3)
  expected = -slopes[:, None, None] * (np.array([0, 3, 7])[:, None] - np.array([0, 2, 5, 7])[None])
  np.testing.assert_allclose(bias[0], expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# RoPE inverse frequencies under every scaling, vs the Hugging Face rope_scaling formulas.

def reference_inv_freq(dim, base, scaling, factor, original, seq_len, beta_fast, beta_slow):
  idx = np.arange(0, dim, 2) / dim
  if scaling == 'none':
    return 1 / base ** idx, 1.0
  if scaling == 'linear':
    return 1 / base ** idx / factor, 1.0
  if scaling == 'ntk':
    return 1 / (base * factor ** (dim / (dim - 2))) ** idx, 1.0
  if scaling == 'dynamic_ntk':  # HF 'dynamic'
    seq = seq_len if seq_len and seq_len > original else original
    new_base = base * ((factor * seq / original) - (factor - 1)) ** (dim / (dim - 2))
    return 1 / new_base ** idx, 1.0
  # HF 'yarn' with truncate=True.
  def corr(rot):
    return dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))
  low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  extrapolation_weight = 1 - ramp
  pos_freqs = base ** idx
  inv = (1 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1 / pos_freqs) * extrapolation_weight
  return inv, 0.1 * math.log(factor) + 1


@pytest.mark.parametrize('scaling', config.ROPE_SCALINGS)
@pytest.mark.parametrize('dim,base,factor,original,seq_len,betas', [
    (8, 10000.0, 2.0, 64, 256, (32.0, 1.0)),
    (16, 10000.0, 4.0, 64, 512, (4.0, 1.0)),
    (32, 500000.0, 8.0, 4096, 32768, (32.0, 1.0)),
    (64, 10000.0, 16.0, 2048, 1000, (32.0, 2.0)),
    (128, 1e6, 1.5, 512, 4096, (16.0, 1.0)),
])
def test_rope_inv_freq_matches_reference(scaling, dim, base, factor, original, seq_len, betas):
  got, scale = positional.rope_inv_freq(dim, base=base, scaling=scaling, factor=factor,
                                        original_length=original, seq_len=seq_len,
                                        beta_fast=betas[0], beta_slow=betas[1])
  want, want_scale = reference_inv_freq(dim, base, scaling, factor, original, seq_len, *betas)
  assert got.shape == (dim // 2,)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert scale == pytest.approx(want_scale)


def test_dynamic_ntk_equals_plain_rope_up_to_the_original_length():
  plain, _ = positional.rope_inv_freq(32)
  for seq_len in (1, 100, 512):
    dyn, _ = positional.rope_inv_freq(32, scaling='dynamic_ntk', factor=4.0, original_length=512,
                                      seq_len=seq_len)
    np.testing.assert_allclose(dyn, plain, rtol=1e-12)
  longer, _ = positional.rope_inv_freq(32, scaling='dynamic_ntk', factor=4.0, original_length=512,
                                       seq_len=1024)
  assert np.all(longer[1:] < plain[1:])


def test_yarn_ramp_endpoints():
  dim, base, original, factor = 64, 10000.0, 2048, 8.0
  plain, _ = positional.rope_inv_freq(dim, base=base)
  yarn, scale = positional.rope_inv_freq(dim, base=base, scaling='yarn', factor=factor,
                                         original_length=original)
  # Wavelength 2π/θ_i: high-frequency dims (many turns over the original length, > beta_fast = 32)
  # keep their frequency; low-frequency dims (< beta_slow = 1 turn) are interpolated by the factor.
  turns = original * plain / (2 * math.pi)
  np.testing.assert_allclose(yarn[turns > 32], plain[turns > 32], rtol=1e-12)
  np.testing.assert_allclose(yarn[turns < 1], plain[turns < 1] / factor, rtol=1e-12)
  mid = (turns <= 32) & (turns >= 1)
  assert np.all(yarn[mid] <= plain[mid]) and np.all(yarn[mid] >= plain[mid] / factor)
  assert scale == pytest.approx(0.1 * math.log(8.0) + 1)


def _scores(cfg, q, k, q_pos, k_pos):
  qr, kr = positional.rotate(cfg, q, k, q_pos, k_pos, seq_len=jnp.asarray(4096))
  return np.asarray(jnp.einsum('bthd,bshd->bhts', qr, kr))


@pytest.mark.parametrize('pos,scaling', [('rope', 'none'), ('rope', 'linear'), ('rope', 'ntk'),
                                         ('rope', 'dynamic_ntk'), ('rope', 'yarn'),
                                         ('xpos', 'none')])
def test_rotary_scores_depend_only_on_the_offset(pos, scaling):
  cfg = ModelConfig(pos=pos, d_model=32, num_heads=2, rope_scaling=scaling, rope_factor=4.0,
                    rope_original_length=64 if scaling != 'none' else 0, xpos_scale_base=64.0)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 9, 2, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 9, 2, 16)), jnp.float32)
  pos0 = jnp.arange(9)[None]
  for shift in (1, 37, 1000):
    np.testing.assert_allclose(_scores(cfg, q, k, pos0 + shift, pos0 + shift),
                               _scores(cfg, q, k, pos0, pos0), rtol=2e-4, atol=2e-4)


def test_rope_matches_the_roformer_rotation():
  """RoFormer eq. 34 in rotate-half layout, recomputed with explicit 2x2 rotations."""
  cfg = ModelConfig(pos='rope', d_model=24, num_heads=2, rope_fraction=0.5)   # rotate 6 of 12 dims
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 5, 2, 12))
  positions = np.array([[0, 1, 4, 9, 30]])
  got, _ = positional.rotate(cfg, jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32),
                             jnp.asarray(positions), jnp.asarray(positions))
  want = x.copy()
  theta = 10000.0 ** (-np.arange(0, 6, 2) / 6)
  for t, p in enumerate(positions[0]):
    for i in range(3):
      a, b = x[0, t, :, i], x[0, t, :, i + 3]
      c, s = math.cos(p * theta[i]), math.sin(p * theta[i])
      want[0, t, :, i], want[0, t, :, i + 3] = a * c - b * s, b * c + a * s
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_xpos_zeta_formula():
  d, gamma = 16, 0.4
  expected = [(2 * i / d + gamma) / (1 + gamma) for i in range(d // 2)]
  np.testing.assert_allclose(positional.xpos_zeta(d, gamma), expected)


def test_xpos_scales_q_and_k_by_zeta_to_plus_minus_n_over_scale_base():
  cfg = ModelConfig(pos='xpos', d_model=16, num_heads=2, xpos_scale_base=8.0)
  rng = np.random.default_rng(2)
  q = rng.normal(size=(1, 6, 2, 8))
  k = rng.normal(size=(1, 6, 2, 8))
  positions = np.arange(6)[None]
  qr, kr = positional.rotate(cfg, jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                             jnp.asarray(positions), jnp.asarray(positions))
  # Score(n, m) = Σ_i ζ_i^((n−m)/sb) · RoPE pair term, independent of any centring constant.
  zeta = (np.arange(0, 8, 2) / 8 + 0.4) / 1.4
  theta = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  for n in range(6):
    for m in range(6):
      want = 0.0
      for i in range(4):
        qa, qb, ka, kb = q[0, n, 0, i], q[0, n, 0, i + 4], k[0, m, 0, i], k[0, m, 0, i + 4]
        angle = (n - m) * theta[i]
        pair = (qa * ka + qb * kb) * math.cos(angle) - (qb * ka - qa * kb) * math.sin(angle)
        want += zeta[i] ** ((n - m) / 8.0) * pair
      got = float(jnp.dot(qr[0, n, 0], kr[0, m, 0]))
      assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_xpos_is_finite_in_float32_at_65536_positions():
  cfg = ModelConfig(pos='xpos', d_model=64, num_heads=1)
  t = 65536
  x = jnp.ones((1, t, 1, 64), jnp.float32) / 8
  positions = jnp.arange(t)[None]
  qr, kr = positional.rotate(cfg, x, x, positions, positions)
  assert bool(jnp.all(jnp.isfinite(qr))) and bool(jnp.all(jnp.isfinite(kr)))
  idx = jnp.array([0, 1, 32767, 65534, 65535])
  scores = jnp.einsum('td,sd->ts', qr[0, idx, 0], kr[0, idx, 0])
  assert bool(jnp.all(jnp.isfinite(jnp.tril(scores))))


# ----------------------------------------------------------------------------------------------
# Absolute and T5.

def test_sinusoidal_matches_vaswani():
  d = 10
  positions = np.array([[0, 1, 5, 1000]])
  got = np.asarray(positional.sinusoidal(jnp.asarray(positions), d))
  want = np.zeros((1, 4, d))
  for t, p in enumerate(positions[0]):
    for i in range(d // 2):
      want[0, t, 2 * i] = math.sin(p / 10000 ** (2 * i / d))
      want[0, t, 2 * i + 1] = math.cos(p / 10000 ** (2 * i / d))
  np.testing.assert_allclose(got, want, atol=1e-4)


def reference_t5_bucket(n, num_buckets, max_distance):
  """mesh-tensorflow _relative_position_bucket, bidirectional=False, n = query − key ≥ 0."""
  n = max(n, 0)
  exact = num_buckets // 2
  if n < exact:
    return n
  val = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
  return min(val, num_buckets - 1)


@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (8, 20), (16, 1000)])
def test_t5_buckets_match_mesh_tensorflow(num_buckets, max_distance):
  q = jnp.arange(3000)[None]
  got = np.asarray(positional.t5_bucket(q, jnp.zeros((1, 1), jnp.int32), num_buckets,
                                        max_distance))[0, :, 0]
  want = [reference_t5_bucket(n, num_buckets, max_distance) for n in range(3000)]
  np.testing.assert_array_equal(got, want)
  # Keys after the query (masked anyway) share bucket 0.
  assert int(positional.t5_bucket(jnp.zeros((1, 1), jnp.int32), jnp.array([[5]]), 32, 128)[0, 0, 0]) == 0


def test_learned_table_never_clamps_silently():
  cfg = ModelConfig(pos='learned', d_model=16, num_heads=2, max_len=8)
  module = positional.AbsoluteEmbedding(cfg, 16)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  out = module.apply(variables, jnp.array([[0, 7, 8, 100]]))
  assert bool(jnp.all(jnp.isfinite(out[0, :2]))) and bool(jnp.all(jnp.isnan(out[0, 2:])))
  with pytest.raises(config.ConfigError, match='model.max_len=8'):
    cfg.check_length(9, 'eval.lengths')


def test_registry_matches_config_names():
  assert set(positional.REGISTRY) == set(config.POSITIONAL_ENCODINGS)
  rotary = {n for n, e in positional.REGISTRY.items() if e.kind == 'rotary'}
  assert rotary == set(config.ROTARY_ENCODINGS)
  assert dataclasses.is_dataclass(positional.REGISTRY['rope'])
