"""Multi-scale retention: RetNet, Sun et al. 2023, "Retentive Network" (§2.1–2.2).

Per head, with Q = (X W_Q) ⊙ Θ and K = (X W_K) ⊙ Θ̄ (Θ_n = e^{inθ}: RoPE's rotation, θ_i =
10000^(−2i/d)) and a decay γ:

  parallel   (eq. 5)  Retention(X) = (Q Kᵀ ⊙ D) V,  D_nm = γ^(n−m) for n ≥ m, else 0;
  recurrent  (eq. 6)  S_n = γ S_{n−1} + K_nᵀ V_n,  Retention(X_n) = Q_n S_n;
  chunkwise  (eq. 7)  within a chunk the parallel form, across chunks R_i = γ^B R_{i−1} + K_[i]ᵀ(V_[i] ⊙ ζ)
                      read as (Q_[i] R_{i−1}) ⊙ ξ.

Multi-scale retention (§2.2): γ = 1 − 2^(−5 − arange(0, h)), one per head; heads are normalised
one by one (GroupNorm with h groups), Y = GroupNorm_h(Concat(head_1 … head_h)), and
MSR(X) = (swish(X W_G) ⊙ Y) W_O. QKᵀ is scaled by d^(−1/2) (§2.2, "normalization"). Decays follow
positions (γ^(p_n − p_m)), so positions must rise by one within a document, as lcr's do. Departures
from the paper: the value dimension equals the key dimension (the paper doubles it and shrinks the
FFN), and its retention-score normalisations (which GroupNorm's scale invariance makes moot, except
for a clamp at 1) are left out, so the three forms agree exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcr import layers, positional
from lcr.config import ModelConfig
from lcr.decode.cache import CacheLayout
from lcr.mixers import heads, state
from lcr.mixers.linear import causal_same_document


def decays(num_heads: int) -> np.ndarray:
  """γ_h = 1 − 2^(−5 − h), h = 0 … num_heads − 1 (Sun et al. 2023 §2.2)."""
  return 1.0 - 2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float64))


def _decay(exponent, log_gamma_H, where):
  """γ^exponent per head, 0 where ``where`` is False (masked exponents never overflow)."""
  e = jnp.where(where, exponent, 0).astype(jnp.float32)[..., None]
  return jnp.where(where[..., None], jnp.exp(e * log_gamma_H.reshape((1,) * (e.ndim - 1) + (-1,))), 0.0)


def retention_chunk(st: dict[str, jax.Array], q, k, v, tok: state.Tokens, *, log_gamma):
  """One chunk: rotated q, k [B,T,H,D] (k scaled), v [B,T,H,D]; state kv [B,H,D,D], pos [B] (of
  the last token in it), doc [B]. Returns (out [B,T,H,D] float32, new state)."""
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  same = causal_same_document(tok)                                             # [B, T, S]
  decay = _decay(tok.pos[:, :, None] - tok.pos[:, None, :], log_gamma, same)    # [B, T, S, H]
  out = jnp.einsum('bthd,bshd,btsh,bshe->bthe', q, k, decay, v)
  continues = tok.real & (tok.doc == st['doc'][:, None])
  cross = _decay(tok.pos - st['pos'][:, None], log_gamma, continues)            # [B, T, H]
  out = out + cross[..., None] * jnp.einsum('bthd,bhde->bthe', q, st['kv'])
  last_doc, last_pos = tok.last(tok.doc), tok.last(tok.pos)
  kept = _decay(last_pos - st['pos'], log_gamma, last_doc == st['doc'])        # [B, H]
  weight = _decay(last_pos[:, None] - tok.pos, log_gamma,
                  tok.real & (tok.doc == last_doc[:, None]))                    # [B, T, H]
  kv = kept[..., None, None] * st['kv'] + jnp.einsum('bthd,bthe,bth->bhde', k, v, weight)
  return out, {'kv': kv, 'pos': last_pos, 'doc': last_doc}


class MultiScaleRetention(nn.Module):
  """RetNet's multi-scale retention as a block's token mixer (see module doc)."""
  cfg: ModelConfig
  cache: CacheLayout | None = None

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table=None, *,
               fresh_cache: bool = False) -> jax.Array:
    cfg = self.cfg
    b, h, d = x_BxTxD.shape[0], cfg.num_heads, cfg.head_dim
    q, k, v = heads.qkv(cfg, x_BxTxD)
    inv_freq, _ = positional.rope_inv_freq(d)
    q = positional.rotate_half(q, positions_BxT, inv_freq)
    k = positional.rotate_half(k, positions_BxT, inv_freq) * (d ** -0.5)
    start, store = state.load(self, self.cache is not None, fresh_cache, {
        'kv': state.Spec((b, h, d, d), jnp.float32, ('batch', 'heads', 'kv', None)),
        'pos': state.Spec((b,), jnp.int32, ('batch',)),
        'doc': state.Spec((b,), jnp.int32, ('batch',))})
    tok = state.tokens(positions_BxT, segments_BxT)
    log_gamma = jnp.asarray(np.log(decays(h)), jnp.float32)
    out, final = state.over_chunks(
        lambda st, *a: retention_chunk(st, *a, log_gamma=log_gamma), start, (q, k, v), tok,
        cfg.mixer_chunk)
    store(final)
    y = group_norm(self, out, cfg)                                               # [B, T, H·D]
    gate = nn.swish(layers.dense(cfg, cfg.d_model, ('embed', 'mlp'), 'gate')(x_BxTxD))
    return layers.dense(cfg, cfg.d_model, ('mlp', 'embed'), 'out')((gate * y).astype(x_BxTxD.dtype))


def group_norm(module: nn.Module, heads_BxTxHxD: jax.Array, cfg: ModelConfig, eps: float = 1e-5):
  """GroupNorm with one group per head (normalised over each head's D values), float32, with a
  learned scale and bias per channel; flattened to [B, T, H·D]."""
  x = heads_BxTxHxD.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  y = ((x - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape[:2] + (-1,))
  scale = module.param('norm_scale', nn.with_logical_partitioning(nn.initializers.ones, ('mlp',)),
                       (y.shape[-1],), jnp.float32)
  bias = module.param('norm_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)),
                      (y.shape[-1],), jnp.float32)
  return y * scale[None, None] + bias[None, None]
