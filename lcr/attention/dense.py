"""The ``xla`` backend: dense attention that materialises the [B, H, T, S] logits.

Heads come first ([B, K, G, T, D]) so every product is a batched matmul over (B, K, G), and the
gradient is written out by hand (``jax.custom_vjp``) the way FlashAttention's backward pass
computes it (Dao et al. 2022, Alg. 4): with P = softmax(S), O = P·V and dO the output gradient,

    dV = Pᵀ·dO,   dP = dO·Vᵀ,   dS = P ⊙ (dP − rowsum(dO ⊙ O)),   dQ = dS·K·scale,   dK = dSᵀ·Q·scale,

using rowsum(dO ⊙ O) = rowsum(dP ⊙ P), a [T, D] reduction instead of a [T, S] one. Only P (and
q, k, v, O) are kept for the backward pass. Same values as automatic differentiation of the
forward pass, in about two thirds of its time on CPU (benchmarks/train_throughput.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcr.attention.masks import MaskSpec

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def grouped(q_BxTxHxD: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, D] → [B, T, K, G, D]: the G = H/K query heads that share each K/V head."""
  b, t, h, d = q_BxTxHxD.shape
  return q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)


def _probs(q, k, bias, visible, scale):
  """P = softmax(scale·q·kᵀ + bias) over visible keys, float32 [B, K, G, T, S]."""
  logits = jnp.einsum('bkgtd,bksd->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  # A row with no visible key gets uniform weights (every logit equal), never NaN.
  return jax.nn.softmax(jnp.where(visible, logits, MASK_VALUE), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def softmax_attention(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias, visible_Bx1x1xTxS, scale):
  """softmax(scale·q·kᵀ + bias) v with heads first; bias [B|1, K, G, T, S] float32 or None."""
  return _forward(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias, visible_Bx1x1xTxS, scale)[0]


def _forward(q, k, v, bias, visible, scale):
  probs = _probs(q, k, bias, visible, scale)
  out = jnp.einsum('bkgts,bksd->bkgtd', probs.astype(v.dtype), v)
  return out, (q, k, v, bias, visible, probs, out)


def _backward(scale, residuals, d_out):
  q, k, v, bias, visible, probs, out = residuals
  d_v = jnp.einsum('bkgts,bkgtd->bksd', probs.astype(v.dtype), d_out)
  d_probs = jnp.einsum('bkgtd,bksd->bkgts', d_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  # Masked logits get no gradient (as through jnp.where), also in rows with no visible key.
  d_logits = jnp.where(visible, probs * (d_probs - row), 0.0)
  d_scaled = (d_logits * scale).astype(q.dtype)
  d_q = jnp.einsum('bkgts,bksd->bkgtd', d_scaled, k)
  d_k = jnp.einsum('bkgts,bkgtd->bksd', d_scaled, q)
  d_bias = None
  if bias is not None:
    d_bias = jnp.sum(d_logits, axis=0, keepdims=True) if bias.shape[0] == 1 else d_logits
    d_bias = d_bias.astype(bias.dtype)
  return d_q, d_k, d_v, d_bias, None


softmax_attention.defvjp(_forward, _backward)


def xla_attention(q, k, v, *, q_pos, k_pos, q_segments, k_segments, mask: MaskSpec, bias_fn,
                  scale, chunk):
  """Softmax attention over the full logits (fine up to a few thousand tokens).

  Grouped-query attention groups query heads over each K/V head instead of repeating K/V.
  Logits, bias and softmax are float32 whatever the activation dtype.
  """
  del chunk
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  q_BxKxGxTxD = grouped(q, kv).transpose(0, 2, 3, 1, 4)
  k_BxKxSxD, v_BxKxSxD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  bias = None
  if bias_fn is not None:
    bias_BxHxTxS = bias_fn(q_pos, k_pos).astype(jnp.float32)
    bias_BxHxTxS = jnp.broadcast_to(bias_BxHxTxS, (bias_BxHxTxS.shape[0], h, t, s))
    bias = bias_BxHxTxS.reshape(-1, kv, h // kv, t, s)
  visible = mask.visible(q_pos, k_pos, q_segments, k_segments, kv_len=s)[:, None, None]
  out = softmax_attention(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias, visible, scale)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
