"""The ``xla`` backend: plain einsum attention that materialises the [B, H, T, S] logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcr.attention.masks import MaskSpec

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def grouped(q_BxTxHxD: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, D] → [B, T, K, G, D]: the G = H/K query heads that share each K/V head."""
  b, t, h, d = q_BxTxHxD.shape
  return q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)


def xla_attention(q, k, v, *, q_pos, k_pos, q_segments, k_segments, mask: MaskSpec, bias_fn,
                  scale, chunk):
  """Softmax attention over the full logits (fine up to a few thousand tokens).

  Grouped-query attention groups query heads over each K/V head instead of repeating K/V.
  Logits, bias and softmax are float32 whatever the activation dtype.
  """
  del chunk
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  logits = jnp.einsum('btkgd,bskd->bkgts', grouped(q, kv), k,
                      preferred_element_type=jnp.float32) * scale
  if bias_fn is not None:
    bias_BxHxTxS = jnp.broadcast_to(bias_fn(q_pos, k_pos), (b, h, t, s))
    logits = logits + bias_BxHxTxS.reshape(b, kv, h // kv, t, s)
  visible_BxTxS = mask.visible(q_pos, k_pos, q_segments, k_segments, kv_len=s)
  logits = jnp.where(visible_BxTxS[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, h, d)
