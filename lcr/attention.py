"""Scaled dot-product attention: one entry point, ``attend``, with backends chosen by name.

softmax(q·kᵀ/√d + bias) v (Vaswani et al. 2017 eq. 1) for multi-head, grouped-query (Ainslie et al.
2023) and multi-query (Shazeer 2019) attention. Masks are computed from positions and segment ids,
never passed in as arrays, so every backend can build the part it needs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lcr.positional import BiasFn

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, q_seg_BxT: jax.Array | None,
            k_seg_BxS: jax.Array | None, *, causal: bool = True, window: int = 0) -> jax.Array:
  """[B, T, S] bool: may query i see key j? Causal by position, same document, within a window."""
  distance = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
  ok = jnp.ones(distance.shape, bool)
  if causal:
    ok &= distance >= 0
  if window:
    ok &= distance < window
  if q_seg_BxT is not None and k_seg_BxS is not None:
    ok &= q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]
  return ok


def _grouped(q_BxTxHxD: jax.Array, kv_heads: int) -> jax.Array:
  b, t, h, d = q_BxTxHxD.shape
  return q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)


def xla_attention(q, k, v, *, q_pos, k_pos, q_segments, k_segments, causal, bias_fn, window,
                  scale):
  """Plain einsum attention; materialises the [B, H, T, S] logits (fine up to a few k tokens).

  Grouped-query attention groups query heads over each K/V head instead of repeating K/V.
  Logits, bias and softmax are float32 whatever the activation dtype.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q_BxTxKxGxD = _grouped(q, kv)
  logits = jnp.einsum('btkgd,bskd->bkgts', q_BxTxKxGxD, k,
                      preferred_element_type=jnp.float32) * scale
  if bias_fn is not None:
    bias_BxHxTxS = jnp.broadcast_to(bias_fn(q_pos, k_pos), (b, h, t, k.shape[1]))
    logits = logits + bias_BxHxTxS.reshape(b, kv, h // kv, t, -1)
  mask_BxTxS = visible(q_pos, k_pos, q_segments, k_segments, causal=causal, window=window)
  logits = jnp.where(mask_BxTxS[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, h, d)


Backend = Callable[..., jax.Array]
BACKENDS: dict[str, Backend] = {'xla': xla_attention}


def attend(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
           q_pos: jax.Array, k_pos: jax.Array, q_segments: jax.Array | None = None,
           k_segments: jax.Array | None = None, causal: bool = True,
           bias_fn: BiasFn | None = None, window: int = 0, scale: float | None = None,
           backend: str = 'xla') -> jax.Array:
  """Attention of queries [B,T,H,D] over keys/values [B,S,K,D] (K divides H) → [B,T,H,D].

  q_pos/k_pos: [B,T]/[B,S] token positions; q_segments/k_segments: document ids (attention never
  crosses documents); bias_fn(q_pos, k_pos) → [B|1, H, T, S] additive logit bias; window > 0
  limits each query to the ``window`` most recent positions; scale defaults to 1/√D.
  """
  if q_BxTxHxD.shape[2] % k_BxSxKxD.shape[2]:
    raise ValueError(f'{q_BxTxHxD.shape[2]} query heads are not a multiple of '
                     f'{k_BxSxKxD.shape[2]} key/value heads')
  if backend not in BACKENDS:
    raise ValueError(f'unknown attention backend {backend!r}; known: {sorted(BACKENDS)}')
  scale = q_BxTxHxD.shape[-1] ** -0.5 if scale is None else scale
  return BACKENDS[backend](q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_pos=q_pos, k_pos=k_pos,
                           q_segments=q_segments, k_segments=k_segments, causal=causal,
                           bias_fn=bias_fn, window=window, scale=scale)
