"""The ``xla`` backend: dense attention that materialises the [B, H, T, S] logits.

Heads come first ([B, K, G, T, D]) so every product is a batched matmul over (B, K, G), and the
gradient is written out by hand (``jax.custom_vjp``) the way FlashAttention's backward pass
computes it (Dao et al. 2022, Alg. 4): with P = softmax(S), O = P·V and dO the output gradient,

    dV = Pᵀ·dO,   dP = dO·Vᵀ,   dS = P ⊙ (dP − rowsum(dO ⊙ O)),   dQ = dS·K·scale,   dK = dSᵀ·Q·scale,

using rowsum(dO ⊙ O) = rowsum(dP ⊙ P), a [T, D] reduction instead of a [T, S] one.

Causal self-attention of 128 tokens or more without a logit bias is computed in query blocks:
block i sees only the keys up to its last row, skipping the masked upper triangle (about 3/8 of
the work with 4 blocks), and P is recomputed in the backward pass instead of stored
(FlashAttention's trade: O(T·D) residuals). Skipping is exact whenever every skipped key is
invisible to the block's queries, which holds when positions grow along the row within each
document (packed training rows); the inputs are checked on device and anything else (permuted
positions, a query with no visible key) takes the dense path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcr.attention.masks import MaskSpec

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MIN_BLOCK_ROWS = 64     # query blocks of fewer rows cost more in overhead than they skip
MAX_BLOCKS = 8


def grouped(q_BxTxHxD: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, D] → [B, T, K, G, D]: the G = H/K query heads that share each K/V head."""
  b, t, h, d = q_BxTxHxD.shape
  return q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)


def query_blocks(mask: MaskSpec, q_len: int, kv_len: int, has_bias: bool = False) -> int:
  """How many query blocks causal self-attention of this length is computed in (1 = dense).

  Not with a logit bias (ALiBi, T5): the bias would be materialised whole ahead of the on-device
  choice between the blocked and the dense path, costing more memory than blocking saves.
  """
  if not mask.causal or q_len != kv_len or has_bias:
    return 1
  return max(1, min(MAX_BLOCKS, q_len // MIN_BLOCK_ROWS))


def block_bounds(length: int, blocks: int) -> list[tuple[int, int]]:
  """[(start, end)] of ``blocks`` near-equal query blocks; block i sees keys [0, end)."""
  edges = [round(i * length / blocks) for i in range(blocks + 1)]
  return list(zip(edges[:-1], edges[1:]))


def blocks_are_exact(visible_BxTxS: jax.Array, blocks: int) -> jax.Array:
  """Scalar bool: no key a block skips is visible to its queries, and every query sees some key."""
  length = visible_BxTxS.shape[-1]
  row_end = np.zeros(length, np.int32)          # the first key index row i's block skips
  for start, end in block_bounds(length, blocks):
    row_end[start:end] = end
  skipped_1xTxS = (jnp.arange(length)[None, None, :] >= jnp.asarray(row_end)[None, :, None])
  return ~jnp.any(visible_BxTxS & skipped_1xTxS) & jnp.all(jnp.any(visible_BxTxS, axis=-1))


def _probs(q, k, bias, visible, scale):
  """P = softmax(scale·q·kᵀ + bias) over visible keys, float32 [B, K, G, T, S]."""
  logits = jnp.einsum('bkgtd,bksd->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  # A row with no visible key gets uniform weights (every logit equal), never NaN.
  return jax.nn.softmax(jnp.where(visible, logits, MASK_VALUE), axis=-1)


def _output(probs, v):
  return jnp.einsum('bkgts,bksd->bkgtd', probs.astype(v.dtype), v)


def _gradients(q, k, v, bias, visible, probs, out, d_out, scale):
  """(dQ, dK, dV, dBias) of one (query block, key prefix) pair from the formulas above."""
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
  return d_q, d_k, d_v, d_bias


def _block_inputs(q, k, v, bias, visible, start, end):
  """Query rows [start, end) and the keys [0, end) they may see."""
  rows = lambda x: x[..., start:end, :end]
  return (q[..., start:end, :], k[..., :end, :], v[..., :end, :],
          None if bias is None else rows(bias), rows(visible))


def _pad_keys(x, length):
  """[..., e, D] → [..., length, D] with zero gradient for the keys a block did not see."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, length - x.shape[-2]), (0, 0)])


def _blocked_forward(q, k, v, bias, visible, scale, blocks):
  outs = []
  for start, end in block_bounds(q.shape[-2], blocks):
    qb, kb, vb, bb, visb = _block_inputs(q, k, v, bias, visible, start, end)
    outs.append(_output(_probs(qb, kb, bb, visb, scale), vb))
  return jnp.concatenate(outs, axis=-2)


def _blocked_backward(q, k, v, bias, visible, out, d_out, scale, blocks):
  s = k.shape[-2]
  d_q, d_k, d_v, d_bias = [], 0.0, 0.0, []
  for start, end in block_bounds(q.shape[-2], blocks):
    qb, kb, vb, bb, visb = _block_inputs(q, k, v, bias, visible, start, end)
    probs = _probs(qb, kb, bb, visb, scale)   # recomputed, not stored
    dq, dk, dv, db = _gradients(qb, kb, vb, bb, visb, probs, out[..., start:end, :],
                                d_out[..., start:end, :], scale)
    d_q.append(dq)
    d_k = d_k + _pad_keys(dk.astype(jnp.float32), s)
    d_v = d_v + _pad_keys(dv.astype(jnp.float32), s)
    if db is not None:
      d_bias.append(jnp.pad(db, [(0, 0)] * (db.ndim - 1) + [(0, s - end)]))
  return (jnp.concatenate(d_q, axis=-2), d_k.astype(k.dtype), d_v.astype(v.dtype),
          jnp.concatenate(d_bias, axis=-2) if bias is not None else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def softmax_attention(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias, visible_Bx1x1xTxS, scale, blocks=1):
  """softmax(scale·q·kᵀ + bias) v with heads first; bias [B|1, K, G, T, S] float32 or None.

  ``blocks`` > 1: causal self-attention in that many query blocks when :func:`blocks_are_exact`
  holds on device, else dense.
  """
  return _forward(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias, visible_Bx1x1xTxS, scale, blocks)[0]


def _forward(q, k, v, bias, visible, scale, blocks):
  if blocks == 1:
    probs = _probs(q, k, bias, visible, scale)
    out = _output(probs, v)
    return out, (q, k, v, bias, visible, probs, out)
  exact = blocks_are_exact(visible[:, 0, 0], blocks)
  out = jax.lax.cond(exact, functools.partial(_blocked_forward, scale=scale, blocks=blocks),
                     functools.partial(_blocked_forward, scale=scale, blocks=1),
                     q, k, v, bias, visible)
  return out, (q, k, v, bias, visible, exact, out)


def _backward(scale, blocks, residuals, d_out):
  if blocks == 1:
    q, k, v, bias, visible, probs, out = residuals
    return (*_gradients(q, k, v, bias, visible, probs, out, d_out, scale), None)
  q, k, v, bias, visible, exact, out = residuals
  grads = jax.lax.cond(exact, functools.partial(_blocked_backward, scale=scale, blocks=blocks),
                       functools.partial(_blocked_backward, scale=scale, blocks=1),
                       q, k, v, bias, visible, out, d_out)
  return (*grads, None)


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
  out = softmax_attention(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, bias, visible, scale,
                          query_blocks(mask, t, s, has_bias=bias is not None))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
