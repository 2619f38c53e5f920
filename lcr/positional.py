"""Positional encodings, chosen by ``model.pos`` from a registry.

Three hooks, one per way an encoding enters the model (positions are always explicit inputs, so
packed rows, offsets, chunked evaluation and cached decoding share this code):
  * ``absolute``: ``embed(positions)`` is added to (or concatenated with) the token embedding;
  * ``rotary``:   ``rotate(q, k, q_pos, k_pos)`` transforms queries and keys (RoPE and its
                  evaluation-time scalings, xPos);
  * ``bias``:     ``bias_fn(q_pos, k_pos) -> [B, H, Tq, Tk]`` is added to the attention logits
                  (ALiBi, T5); a function of positions, so a backend can evaluate it per chunk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcr.config import ModelConfig

BiasFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Bias:
  """A logit bias ``(q_pos, k_pos) → [B|1, H, T, S]`` whose learned arrays are explicit:
  ``fn(q_pos, k_pos, *params)``. Sharded attention passes ``params`` into ``shard_map`` (which
  cannot close over traced arrays) and rebinds them with :meth:`with_params`."""
  fn: Callable[..., jax.Array]
  params: tuple[jax.Array, ...] = ()

  def __call__(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    return self.fn(q_pos, k_pos, *self.params)

  def with_params(self, params) -> Bias:
    return dataclasses.replace(self, params=tuple(params))


@dataclasses.dataclass(frozen=True)
class Encoding:
  name: str
  kind: str      # 'none' | 'absolute' | 'rotary' | 'bias'
  paper: str


REGISTRY: dict[str, Encoding] = {e.name: e for e in (
    Encoding('none', 'none', 'NoPE: no positional information (Haviv et al. 2022; Kazemnejad et al. 2023)'),
    Encoding('learned', 'absolute', 'learned absolute table (Gehring et al. 2017; GPT-2)'),
    Encoding('sinusoidal', 'absolute', 'sinusoids, Vaswani et al. 2017 §3.5'),
    Encoding('rope', 'rotary', 'rotary embedding, Su et al. 2021 (RoFormer) eq. 34'),
    Encoding('xpos', 'rotary', 'extrapolatable RoPE, Sun et al. 2022 (xPos) §3.2'),
    Encoding('alibi', 'bias', 'linear biases, Press et al. 2022 (ALiBi) §3'),
    Encoding('t5', 'bias', 'bucketed relative bias, Raffel et al. 2020 (T5) §2.1'),
)}


def kind(cfg: ModelConfig) -> str:
  return REGISTRY[cfg.pos].kind


# ----------------------------------------------------------------------------------------------
# Absolute encodings.


def sinusoidal(positions: jax.Array, dim: int) -> jax.Array:
  """Vaswani et al. 2017 §3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(same)."""
  inv = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))          # [ceil(d/2)]
  positions = positions.astype(jnp.float32)[..., None]
  angles = positions * inv.reshape((1,) * (positions.ndim - 1) + (-1,))               # [..., d/2]
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], -1)
  return pe[..., :dim]


class AbsoluteEmbedding(nn.Module):
  """``learned`` (a trained table of ``max_len`` rows) or ``sinusoidal`` position vectors."""
  cfg: ModelConfig
  dim: int

  @nn.compact
  def __call__(self, positions_BxT: jax.Array) -> jax.Array:
    if self.cfg.pos == 'sinusoidal':
      return sinusoidal(positions_BxT, self.dim)
    table = self.param(
        'pos_embedding',
        nn.with_logical_partitioning(nn.initializers.normal(stddev=2 ** -0.5), (None, 'embed')),
        (self.cfg.max_len, self.dim), jnp.dtype(self.cfg.param_dtype))
    # A position past the table would be clamped silently by a JAX gather; fill with NaN instead
    # so the mistake cannot go unnoticed (ModelConfig.check_length rejects it before compiling).
    # Like the token lookup, the gather reads the whole (all-gathered) table.
    table = nn.with_logical_constraint(table, (None, None))
    return jnp.take(table, positions_BxT, axis=0, mode='fill', fill_value=jnp.nan)


# ----------------------------------------------------------------------------------------------
# Rotary encodings: RoPE, its evaluation-time scalings, xPos.


def _yarn_correction_range(dim: int, base: float, original_length: int, beta_fast: float,
                           beta_slow: float) -> tuple[float, float]:
  """YaRN (Peng et al. 2023) eq. 17-18: dims whose wavelength spans beta_fast..beta_slow turns."""
  def dim_for(turns):  # the rotary dim index whose frequency turns `turns` times over the length
    return dim * math.log(original_length / (turns * 2 * math.pi)) / (2 * math.log(base))
  low, high = math.floor(dim_for(beta_fast)), math.ceil(dim_for(beta_slow))
  return max(low, 0), min(high, dim - 1)


def yarn_ramp(dim: int, base: float, original_length: int, beta_fast: float = 32.0,
              beta_slow: float = 1.0) -> np.ndarray:
  """Per-frequency interpolation weight γ in [0, 1]: 0 = keep (extrapolate), 1 = interpolate."""
  low, high = _yarn_correction_range(dim, base, original_length, beta_fast, beta_slow)
  high = high + 0.001 if low == high else high
  return np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def yarn_attention_scale(factor: float) -> float:
  """YaRN eq. 22: sqrt(1/t) = 0.1 ln(s) + 1, applied to both q and k."""
  return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def ntk_base(base: float, dim: int, alpha: float) -> float:
  """NTK-aware base change (bloc97 2023): base · α^(d / (d − 2))."""
  return base * alpha ** (dim / (dim - 2))


def dynamic_ntk_alpha(factor: float, seq_len, original_length: int):
  """Dynamic NTK (Emozilla 2023): α = factor·L/L_orig − (factor − 1), only once L > L_orig."""
  seq_len = jnp.maximum(seq_len, original_length) if isinstance(seq_len, jax.Array) else max(
      seq_len, original_length)
  return factor * seq_len / original_length - (factor - 1)


def rope_inv_freq(head_dim: int, *, base: float = 10000.0, scaling: str = 'none',
                  factor: float = 1.0, original_length: int | None = None,
                  seq_len: int | None = None, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> tuple[np.ndarray, float]:
  """RoPE inverse frequencies θ_i = base^(−2i/d) under an evaluation-time scaling.

  Returns (inv_freq of shape [head_dim // 2], attention scale applied to both q and k).
  ``linear``, ``dynamic_ntk`` and ``yarn`` match the Hugging Face rope_scaling types ``linear``,
  ``dynamic`` and ``yarn``; ``ntk`` is the static NTK-aware base change with α = factor.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  plain = 1.0 / base ** exponents
  if scaling == 'none':
    return plain, 1.0
  if scaling == 'linear':  # Position interpolation, Chen et al. 2023 eq. 4: m → m / s.
    return plain / factor, 1.0
  if scaling == 'ntk':
    return 1.0 / ntk_base(base, head_dim, factor) ** exponents, 1.0
  if original_length is None:
    raise ValueError(f'rope scaling {scaling!r} needs original_length')
  if scaling == 'dynamic_ntk':
    alpha = dynamic_ntk_alpha(factor, seq_len or original_length, original_length)
    return 1.0 / ntk_base(base, head_dim, alpha) ** exponents, 1.0
  if scaling == 'yarn':  # Peng et al. 2023 eq. 19-20: blend interpolated and original per dim.
    gamma = yarn_ramp(head_dim, base, original_length, beta_fast, beta_slow)
    return plain / factor * gamma + plain * (1 - gamma), yarn_attention_scale(factor)
  raise ValueError(f'unknown rope scaling {scaling!r}')


def dynamic_inv_freq(cfg: ModelConfig, seq_len: jax.Array) -> jax.Array:
  """``rope_inv_freq(scaling='dynamic_ntk')`` with traced current lengths: [..., R/2] for seq_len [...]."""
  dim = cfg.rotary_dim
  alpha = dynamic_ntk_alpha(cfg.rope_factor, jnp.asarray(seq_len).astype(jnp.float32),
                            cfg.rope_original_length)
  base = (cfg.rope_base * alpha ** (dim / (dim - 2)))[..., None]
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  return 1.0 / base ** exponents.reshape((1,) * (base.ndim - 1) + (-1,))


def rotate_by(x: jax.Array, angles: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
  """RoFormer eq. 34 in the rotate-half layout for given angles: x·cos(a) + rot(x)·sin(a).

  x: [..., D]; angles: [..., R/2] broadcastable against x's leading dims, R ≤ D the rotated width
  (the first R dims rotate, the rest pass through); ``scale`` multiplies the rotated part.
  Computed in float32, returned in x's dtype.
  """
  rot = 2 * angles.shape[-1]
  xf = x.astype(jnp.float32)
  x_rot, x_pass = xf[..., :rot], xf[..., rot:]
  cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
  x1, x2 = x_rot[..., :rot // 2], x_rot[..., rot // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  x_pass = jnp.broadcast_to(x_pass, rotated.shape[:-1] + x_pass.shape[-1:])
  return jnp.concatenate([rotated, x_pass], axis=-1).astype(x.dtype)


def _per_token(values_BxT: jax.Array, heads_first: bool) -> jax.Array:
  """[B, T] → [B, T, 1, 1] for [B, T, N, D] arrays, or [B, 1, T, 1] for heads-first [B, N, T, D]."""
  return values_BxT[:, None, :, None] if heads_first else values_BxT[:, :, None, None]


def rotate_half(x: jax.Array, positions: jax.Array, inv_freq, scale: jax.Array | float = 1.0, *,
                heads_first: bool = False):
  """RoFormer eq. 34 in the rotate-half layout: x·cos(pθ) + rot(x)·sin(pθ), first dims only.

  x: [B, T, N, D] (or [B, N, T, D] with ``heads_first``); positions: [B, T]; inv_freq: [R/2], or
  [B, R/2] (one set per row), with R ≤ D the rotated width; ``scale`` multiplies the rotated part
  (broadcastable to [B, T, 1, R/2] in x's layout, or a scalar).
  """
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  inv_freq = inv_freq[:, None, None, :] if inv_freq.ndim == 2 else inv_freq.reshape(1, 1, 1, -1)
  angles = _per_token(positions.astype(jnp.float32), heads_first) * inv_freq
  return rotate_by(x, angles, scale)


def xpos_zeta(head_dim: int, gamma: float = 0.4) -> np.ndarray:
  """xPos (Sun et al. 2022) eq. 11: ζ_i = (2i/d + γ) / (1 + γ), i = 0 … d/2 − 1."""
  return (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim + gamma) / (1 + gamma)


def _xpos_scale(cfg: ModelConfig, positions: jax.Array, centre: jax.Array, sign: float,
                heads_first: bool = False):
  """ζ^(±(n − c)/scale_base) as exp(± (n − c)/scale_base · ln ζ), [B, T, 1, D/2], float32.

  Centring positions on c (any constant shared by q and k cancels in q·k) keeps the exponent within
  ±T/2, so 65k-token inputs stay finite in float32.
  """
  log_zeta = jnp.log(jnp.asarray(xpos_zeta(cfg.rotary_dim, cfg.xpos_gamma), jnp.float32))
  log_zeta = log_zeta.reshape(1, 1, 1, -1)
  n = _per_token((positions - centre).astype(jnp.float32), heads_first) / cfg.xpos_scale_base
  return jnp.exp(sign * n * log_zeta)


def rotate(cfg: ModelConfig, q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
           *, seq_len: jax.Array | None = None,
           k_heads_first: bool = False) -> tuple[jax.Array, jax.Array]:
  """Applies RoPE (with ``cfg.rope_scaling``) or xPos to q [B,Tq,H,D] and k [B,Tk,K,D] (or
  [B,K,Tk,D] with ``k_heads_first``, the layout of the KV cache).

  ``seq_len`` is the current length that dynamic NTK computes its base from: a scalar, or [B] for
  one base per row (default: the largest key position + 1). The exact per-query form of dynamic
  NTK, which the model uses, is :func:`lcr.attention.per_query_rope.attention`.
  """
  if cfg.pos == 'xpos':
    inv_freq, _ = rope_inv_freq(cfg.rotary_dim, base=cfg.rope_base)
    centre = jnp.max(k_pos) // 2
    return (rotate_half(q, q_pos, inv_freq, _xpos_scale(cfg, q_pos, centre, +1.0)),
            rotate_half(k, k_pos, inv_freq, _xpos_scale(cfg, k_pos, centre, -1.0, k_heads_first),
                        heads_first=k_heads_first))
  if cfg.rope_scaling == 'dynamic_ntk':
    inv_freq, scale = dynamic_inv_freq(cfg, jnp.max(k_pos) + 1 if seq_len is None else seq_len), 1.0
  else:
    inv_freq, scale = rope_inv_freq(
        cfg.rotary_dim, base=cfg.rope_base, scaling=cfg.rope_scaling, factor=cfg.rope_factor,
        original_length=cfg.rope_original_length or None, beta_fast=cfg.yarn_beta_fast,
        beta_slow=cfg.yarn_beta_slow)
  return (rotate_half(q, q_pos, inv_freq, scale),
          rotate_half(k, k_pos, inv_freq, scale, heads_first=k_heads_first))


# ----------------------------------------------------------------------------------------------
# Bias encodings: ALiBi and T5.


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes (Press et al. 2022 §3 and their reference code).

  For h a power of two: the geometric sequence 2^(−8/h), 2^(−16/h), …, 2^(−8). Otherwise the slopes
  of the closest smaller power of two p, followed by every other slope of 2p (the odd-indexed
  terms 2^(−4/p), 2^(−12/p), …) until h slopes are taken.
  """
  def geometric(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  p = 2 ** math.floor(math.log2(num_heads))
  slopes = geometric(p) + geometric(2 * p)[0::2][:num_heads - p]
  return np.asarray(slopes, dtype=np.float64)


def alibi_bias(num_heads: int, *, causal: bool = True) -> BiasFn:
  """ALiBi eq. in §3: bias −m_h·(i − j) added to q_i·k_j/√d (the slope is not scaled by √d).

  ``causal=False`` (an encoder, where keys follow the query too): the symmetric −m_h·|i − j|, as
  bidirectional ALiBi models use (the paper defines only the causal form).
  """
  slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)

  def bias_fn(q_pos_BxT, k_pos_BxS):
    distance = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]).astype(jnp.float32)
    distance = distance if causal else jnp.abs(distance)
    return -slopes[None, :, None, None] * distance[:, None]
  return Bias(bias_fn)


def t5_bucket(q_pos: jax.Array, k_pos: jax.Array, num_buckets: int, max_distance: int, *,
              bidirectional: bool = False):
  """T5 relative-position bucket (Raffel et al. 2020 §2.1; mesh-tensorflow), [B, T, S].

  Causal form: distances n = i − j ≥ 0 below num_buckets/2 get their own bucket; larger ones share
  logarithmically wider buckets up to max_distance; everything beyond shares the last bucket (keys
  after the query, masked anyway, share bucket 0). ``bidirectional`` (T5's encoder): half the
  buckets per direction, keys after the query (j > i) in the upper half, each half bucketed by
  |i − j| as above.
  """
  n = q_pos[:, :, None] - k_pos[:, None, :]
  offset = 0
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(n < 0, num_buckets, 0)
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
  large = exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32)
  return offset + jnp.where(n < exact, n, jnp.minimum(large, num_buckets - 1))


class T5Table(nn.Module):
  """The learned [num_buckets, num_heads] bias table, shared by every layer as in T5."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param(
        'rel_bias', nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, 'heads')),
        (self.cfg.t5_num_buckets, self.cfg.num_heads), jnp.dtype(self.cfg.param_dtype))


def t5_bias(cfg: ModelConfig, table: jax.Array, *, causal: bool = True) -> BiasFn:
  def bias_fn(q_pos_BxT, k_pos_BxS, table):
    buckets = t5_bucket(q_pos_BxT, k_pos_BxS, cfg.t5_num_buckets, cfg.t5_max_distance,
                        bidirectional=not causal)
    return jnp.moveaxis(table.astype(jnp.float32)[buckets], -1, 1)     # [B, H, T, S]
  return Bias(bias_fn, (table,))


def bias_fn(cfg: ModelConfig, table: jax.Array | None, *, causal: bool = True) -> BiasFn | None:
  """The score bias of a ``bias`` encoding (None for the others); ``table`` is T5's parameter.

  ``causal=False`` gives the bidirectional form an encoder needs (T5's two-sided buckets, ALiBi's
  −m·|i − j|).
  """
  if cfg.pos == 'alibi':
    return alibi_bias(cfg.num_heads, causal=causal)
  if cfg.pos == 't5':
    return t5_bias(cfg, table, causal=causal)
  return None
