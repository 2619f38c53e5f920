"""Positional encodings against their papers' formulas, recomputed independently in NumPy."""

import dataclasses
import functools
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
  plain = 10000.0 ** (-np.arange(0, 32, 2) / 32)     # RoFormer eq. 15
  for seq_len in (1, 100, 512):
    dyn, _ = positional.rope_inv_freq(32, scaling='dynamic_ntk', factor=4.0, original_length=512,
                                      seq_len=seq_len)
    np.testing.assert_allclose(dyn, plain, rtol=1e-12)
  longer, _ = positional.rope_inv_freq(32, scaling='dynamic_ntk', factor=4.0, original_length=512,
                                       seq_len=1024)
  assert np.all(longer[1:] < plain[1:])


def test_yarn_ramp_endpoints():
  dim, base, original, factor = 64, 10000.0, 2048, 8.0
  plain = base ** (-np.arange(0, dim, 2) / dim)      # RoFormer eq. 15
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
  """An invariant (RoFormer §3.4.2): shifting every position leaves q·k unchanged; the scores
  themselves are checked against NumPy in test_rotate_scores_match_hugging_face_formulas."""
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


# ----------------------------------------------------------------------------------------------
# rotate() itself: q·k after what the model applies, against NumPy from the Hugging Face formulas.

# Non-default everything, so a field that does not reach rotate() changes the scores: base 5000,
# factor 3, YaRN betas (16, 2) (their ramp spans other dims than the defaults' (32, 1) here).
ROT = dict(head_dim=32, base=5000.0, original=512, factor=3.0, betas=(16.0, 2.0))
# Positions within, at and past the original length, and far past it.
ROT_POSITIONS = np.array([[0, 1, 5, 63, 200, 511, 512, 700, 1500]])


def rotary_config(scaling, fraction, pos='rope'):
  scaled = scaling != 'none'
  return ModelConfig(
      pos=pos, d_model=2 * ROT['head_dim'], num_heads=2, rope_base=ROT['base'],
      rope_fraction=fraction, rope_scaling=scaling, rope_factor=ROT['factor'] if scaled else 1.0,
      rope_original_length=ROT['original'] if scaled else 0, yarn_beta_fast=ROT['betas'][0],
      yarn_beta_slow=ROT['betas'][1])


def reference_rotary_scores(q, k, q_pos, k_pos, inv_freq, scale=1.0, zeta=None, scale_base=1.0):
  """[B, H, Tq, Tk] q·k after rotation, in float64 and complex form (RoFormer §3.2.2).

  Dims (i, i + R/2) are z = x_i + j·x_(i+R/2), turned by e^(j·p·θ_i) and multiplied by the
  attention scale on both q and k (Hugging Face multiplies cos and sin by it), so the score carries
  scale²; dims past R (partial rotary, GPT-NeoX) pass unrotated and unscaled. xPos (Sun et al. 2022
  eq. 11) multiplies the query's pair i by ζ_i^(n/scale_base) and the key's by ζ_i^(−m/scale_base).
  """
  half = len(inv_freq)

  def turned(x, pos, sign):
    z = x[..., :half] + 1j * x[..., half:2 * half]
    z = z * np.exp(1j * pos[:, :, None, None] * inv_freq) * scale
    return z if zeta is None else z * zeta ** (sign * pos[:, :, None, None] / scale_base)
  rotary = np.einsum('bthi,bshi->bhts', turned(q, q_pos, 1), np.conj(turned(k, k_pos, -1))).real
  return rotary + np.einsum('bthd,bshd->bhts', q[..., 2 * half:], k[..., 2 * half:])


@functools.cache
def jitted_rotate(cfg):
  """rotate() under jit, ``seq_len`` a traced argument (one compile per config and seq_len kind)."""
  return jax.jit(lambda q, k, qp, kp, seq_len: positional.rotate(cfg, q, k, qp, kp,
                                                                 seq_len=seq_len))


def rotated_scores(cfg, q, k, positions, seq_len=None):
  qr, kr = jitted_rotate(cfg)(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                              jnp.asarray(positions), jnp.asarray(positions), seq_len)
  return np.einsum('bthd,bshd->bhts', np.asarray(qr, np.float64), np.asarray(kr, np.float64))


def random_qk(seed, t, d):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(1, t, 2, d)), rng.normal(size=(1, t, 2, d))


@pytest.mark.parametrize('fraction', [0.5, 1.0])
@pytest.mark.parametrize('scaling', config.ROPE_SCALINGS)
def test_rotate_scores_match_hugging_face_formulas(scaling, fraction):
  """Every scaling × rope_fraction, factor 3, YaRN betas (16, 2): the frequencies of the rotated
  dims, YaRN's attention scale on q and k, and dynamic NTK's default length max(k_pos) + 1."""
  cfg = rotary_config(scaling, fraction)
  q, k = random_qk(0, ROT_POSITIONS.shape[1], ROT['head_dim'])
  rotary_dim = int(ROT['head_dim'] * fraction)
  inv_freq, scale = reference_inv_freq(
      rotary_dim, ROT['base'], scaling, ROT['factor'], ROT['original'],
      int(ROT_POSITIONS.max()) + 1, *ROT['betas'])
  want = reference_rotary_scores(q, k, ROT_POSITIONS, ROT_POSITIONS, inv_freq, scale)
  got = rotated_scores(cfg, q, k, ROT_POSITIONS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
  if scaling == 'yarn':                   # the scale is really there, squared, not just close to 1
    assert scale ** 2 > 1.2


@pytest.mark.parametrize('fraction', [0.5, 1.0])
@pytest.mark.parametrize('seq_len', [100, 512, 513, 4096])
def test_rotate_dynamic_ntk_at_a_traced_length_below_and_above_the_original(seq_len, fraction):
  """Below (and at) the original length dynamic NTK is plain RoPE; past it the base grows with the
  length reached (Hugging Face ``dynamic``: α = factor·L/L₀ − (factor − 1), L = max(L, L₀))."""
  cfg = rotary_config('dynamic_ntk', fraction)
  q, k = random_qk(1, ROT_POSITIONS.shape[1], ROT['head_dim'])
  rotary_dim = int(ROT['head_dim'] * fraction)
  inv_freq, _ = reference_inv_freq(rotary_dim, ROT['base'], 'dynamic_ntk', ROT['factor'],
                                   ROT['original'], seq_len, *ROT['betas'])
  want = reference_rotary_scores(q, k, ROT_POSITIONS, ROT_POSITIONS, inv_freq)
  got = rotated_scores(cfg, q, k, ROT_POSITIONS, jnp.asarray(seq_len, jnp.int32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
  plain, _ = reference_inv_freq(rotary_dim, ROT['base'], 'none', 1.0, 0, 0, *ROT['betas'])
  assert np.array_equal(inv_freq, plain) == (seq_len <= ROT['original'])


def test_rotate_dynamic_ntk_length_defaults_to_the_largest_key_position_plus_one():
  """Hugging Face takes the length from the positions, max(position_ids) + 1: keys at 0…9 with an
  original length of 8 give α = 3·10/8 − 2 = 1.75 (one less would give 1.375)."""
  cfg = dataclasses.replace(rotary_config('dynamic_ntk', 1.0), rope_original_length=8)
  positions = np.arange(10)[None]
  q, k = random_qk(3, 10, ROT['head_dim'])
  inv_freq, _ = reference_inv_freq(ROT['head_dim'], ROT['base'], 'dynamic_ntk', ROT['factor'], 8,
                                   10, *ROT['betas'])
  want = reference_rotary_scores(q, k, positions, positions, inv_freq)
  np.testing.assert_allclose(rotated_scores(cfg, q, k, positions), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('fraction', [0.5, 1.0])
def test_rotate_xpos_with_non_default_gamma_scale_base_and_base(fraction):
  """xPos scores Σ_i ζ_i^((n−m)/scale_base)·(RoPE pair term), ζ_i = (2i/R + γ)/(1 + γ), for
  γ = 0.25, scale base 96, RoPE base 5000, over the causal pairs (m ≤ n) xPos is used for."""
  cfg = dataclasses.replace(rotary_config('none', fraction, pos='xpos'), xpos_gamma=0.25,
                            xpos_scale_base=96.0)
  positions = np.array([[0, 3, 40, 90, 150, 151, 300]])
  q, k = random_qk(2, positions.shape[1], ROT['head_dim'])
  r = int(ROT['head_dim'] * fraction)
  inv_freq = ROT['base'] ** (-np.arange(0, r, 2) / r)
  zeta = (np.arange(0, r, 2) / r + 0.25) / 1.25
  want = reference_rotary_scores(q, k, positions, positions, inv_freq, zeta=zeta, scale_base=96.0)
  causal = positions[0][:, None] >= positions[0][None, :]
  got = rotated_scores(cfg, q, k, positions)
  np.testing.assert_allclose(np.where(causal, got, 0), np.where(causal, want, 0), rtol=1e-4,
                             atol=1e-4)


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
