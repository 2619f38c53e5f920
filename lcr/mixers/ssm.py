"""A selective state-space layer: Mamba's S6 block, Gu & Dao 2023 (§3.2, Algorithm 2; §3.4, Fig. 3).

    x, z = split(X W_in)                        (inner width E = ssm_expand · d_model each)
    x = silu(conv1d(x))                         causal depthwise convolution of width ssm_conv
    Δ = softplus(x W_Δ↓ W_Δ↑ + b_Δ),  B = x W_B,  C = x W_C      (input-dependent: "selective")
    Ā = exp(Δ A),  B̄ = Δ B                      (A = −exp(A_log) diagonal, [E, N]; ZOH for A,
                                                  Euler for B, as the reference implementation)
    h_t = Ā_t ⊙ h_{t−1} + B̄_t x_t,  y_t = C_t · h_t + D ⊙ x_t
    out = (y ⊙ silu(z)) W_out

The recurrence h_t = a_t h_{t−1} + b_t runs as ``jax.lax.associative_scan`` over the pairs
(a, b) with (a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂) (Blelloch 1990; Smith et al. 2023, S5), in
parallel over the length. A document starts from h = 0 (a = 0 at its first token) and its
convolution never reads another document's inputs. Initialisation as Mamba's: A_log = log(1 … N)
(S4D-real), D = 1, b_Δ = softplus⁻¹(Δ₀) with Δ₀ log-uniform in [0.001, 0.1].
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr import layers
from lcr.config import ModelConfig
from lcr.decode.cache import CacheLayout
from lcr.mixers import state

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def combine(first, second):
  """(a₁, b₁) then (a₂, b₂): h ↦ a₂(a₁h + b₁) + b₂ = (a₁a₂)h + (a₂b₁ + b₂)."""
  a1, b1 = first
  a2, b2 = second
  return a1 * a2, a2 * b1 + b2


def scan(a_BxTxExN: jax.Array, b_BxTxExN: jax.Array, h0_BxExN: jax.Array) -> jax.Array:
  """h_t = a_t h_{t−1} + b_t from h_{−1} = h0, for every t: [B, T, E, N]."""
  b = b_BxTxExN.at[:, 0].add(a_BxTxExN[:, 0] * h0_BxExN)
  return jax.lax.associative_scan(combine, (a_BxTxExN, b), axis=1)[1]


def causal_conv(x_BxTxE, kernel_WxE, bias_E, tok: state.Tokens, buffer_x, buffer_doc):
  """y_t = Σ_i kernel[i] x_{t−(W−1)+i} + bias over [buffer; x], inputs of other documents as 0.

  ``buffer_x`` [B, W−1, E] and ``buffer_doc`` [B, W−1] are the inputs before this call (doc 0:
  none). Returns (y, the W−1 latest real inputs with their documents after the call)."""
  w, t = kernel_WxE.shape[0], x_BxTxE.shape[1]
  x_all = jnp.concatenate([buffer_x.astype(x_BxTxE.dtype), x_BxTxE], axis=1)
  doc_all = jnp.concatenate([buffer_doc, tok.doc], axis=1)
  y = jnp.broadcast_to(bias_E.astype(jnp.float32), x_BxTxE.shape)
  for i in range(w):
    same = (doc_all[:, i:i + t] == tok.doc)[..., None]
    tap = x_all[:, i:i + t].astype(jnp.float32) * kernel_WxE[i].astype(jnp.float32)[None, None]
    y = y + jnp.where(same, tap, 0.0)
  start = jnp.sum(tok.real, axis=1)            # the W − 1 entries ending at the last real input
  take = jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, w - 1, axis=0))
  return y, take(x_all, start), take(doc_all, start)


def _dt_bias(rng, shape, dtype):
  """softplus⁻¹(Δ₀), Δ₀ log-uniform in [DT_MIN, DT_MAX] (Mamba's dt initialisation)."""
  u = jax.random.uniform(rng, shape, jnp.float32)
  dt = jnp.maximum(jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)), DT_FLOOR)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _uniform(limit: float):
  return lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -limit, limit)


class SelectiveSSM(nn.Module):
  """Mamba's selective SSM block as a block's token mixer (see module doc)."""
  cfg: ModelConfig
  cache: CacheLayout | None = None

  def _param(self, name, init, shape, axes):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(self.cfg.param_dtype))

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table=None, *,
               fresh_cache: bool = False) -> jax.Array:
    cfg = self.cfg
    b, inner, n = x_BxTxD.shape[0], cfg.ssm_expand * cfg.d_model, cfg.ssm_state
    rank = cfg.ssm_dt_rank or math.ceil(cfg.d_model / 16)
    tok = state.tokens(positions_BxT, segments_BxT)
    start, store = state.load(self, self.cache is not None, fresh_cache, {
        'h': state.Spec((b, inner, n), jnp.float32, ('batch', 'mlp', None)),
        'conv_x': state.Spec((b, cfg.ssm_conv - 1, inner), jnp.dtype(cfg.dtype), ('batch', None, 'mlp')),
        'conv_doc': state.Spec((b, cfg.ssm_conv - 1), jnp.int32, ('batch', None)),
        'doc': state.Spec((b,), jnp.int32, ('batch',))})
    xz = layers.dense(cfg, 2 * inner, ('embed', 'mlp'), 'in_proj')(x_BxTxD)
    x, z = xz[..., :inner], xz[..., inner:]
    kernel = self._param('conv_kernel', nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                         (cfg.ssm_conv, inner), (None, 'mlp'))
    conv_bias = self._param('conv_bias', nn.initializers.zeros, (inner,), ('mlp',))
    x, conv_x, conv_doc = causal_conv(x, kernel, conv_bias, tok, start['conv_x'], start['conv_doc'])
    x = nn.silu(x)                                                               # [B, T, E] f32
    dbc = layers.dense(cfg, rank + 2 * n, ('mlp', None), 'x_proj')(x.astype(x_BxTxD.dtype))
    dt_low, b_in, c_out = (dbc[..., :rank], dbc[..., rank:rank + n], dbc[..., rank + n:])
    dt = nn.Dense(inner, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype), name='dt_proj',
                  kernel_init=nn.with_logical_partitioning(_uniform(rank ** -0.5), (None, 'mlp')),
                  bias_init=nn.with_logical_partitioning(_dt_bias, ('mlp',)))(dt_low)
    dt = jax.nn.softplus(dt.astype(jnp.float32))
    a_log = self._param('A_log', lambda r, s, d: jnp.broadcast_to(
        jnp.log(jnp.arange(1, s[1] + 1, dtype=jnp.float32)), s).astype(d), (inner, n), ('mlp', None))
    skip = self._param('D', nn.initializers.ones, (inner,), ('mlp',))
    a = jnp.exp(dt[..., None] * -jnp.exp(a_log.astype(jnp.float32))[None, None])  # [B, T, E, N]
    previous_doc = jnp.concatenate([start['doc'][:, None], tok.doc[:, :-1]], axis=1)
    a = jnp.where((tok.doc != previous_doc)[..., None, None], 0.0, a)            # a document starts
    bx = (dt * x)[..., None] * b_in.astype(jnp.float32)[:, :, None, :]
    h = scan(a, bx, start['h'])
    y = jnp.einsum('bten,btn->bte', h, c_out.astype(jnp.float32)) + skip.astype(jnp.float32)[None, None] * x
    y = y * nn.silu(z.astype(jnp.float32))
    new = {'h': tok.last(h), 'conv_x': conv_x, 'conv_doc': conv_doc, 'doc': tok.last(tok.doc)}
    store(state.keep_without_tokens(tok, new, start))
    return layers.dense(cfg, cfg.d_model, ('mlp', 'embed'), 'out_proj')(y.astype(x_BxTxD.dtype))
