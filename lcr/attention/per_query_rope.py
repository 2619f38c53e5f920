"""Attention in which every query rotates the keys with its own RoPE frequencies (dynamic NTK).

Dynamic NTK (Emozilla 2023) computes the RoPE base from the length reached so far: a query at
position p uses α = s·(p + 1)/L − (s − 1) once p + 1 > L (lcr.positional.dynamic_ntk_alpha). In
generation the query at p sees every earlier key rotated with *that same* base, so the scores of
query p are those of a full forward over tokens 0..p at base(p + 1). This module computes exactly
that for every query of a sequence at once, so a full forward, a prefill and cached token-by-token
decoding (which re-rotates its cache of unrotated keys each step) give the same logits in every
layer.

With rotate-half RoPE (RoFormer eq. 34) and θ_i(p) the query's frequencies, the score of query p
and key r is q_rot(p, θ(p)) · k_rot(r, θ(p)), so keys are rotated once per query: queries are
processed in blocks of ``c`` and the [B, c, S, K, D] rotated keys of one block are the largest
array (kept under ``MAX_BLOCK_BYTES``). Softmax and masking as in the ``xla`` backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcr import positional
from lcr.attention.dense import MASK_VALUE, grouped
from lcr.attention.masks import MaskSpec

MAX_BLOCK_BYTES = 64 << 20   # rotated keys of one query block


def query_block(batch: int, kv_len: int, kv_heads: int, head_dim: int, q_len: int) -> int:
  per_query = batch * kv_len * kv_heads * head_dim * 4
  return int(max(1, min(q_len, MAX_BLOCK_BYTES // max(per_query, 1))))


def attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
              inv_freq_BxTxR: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
              q_segments: jax.Array | None, k_segments: jax.Array | None, mask: MaskSpec,
              scale: float | None = None) -> jax.Array:
  """softmax(q_rot·k_rotᵀ·scale) v with query t's frequencies ``inv_freq_BxTxR[:, t]`` ([.., R/2]).

  q and k come unrotated. Returns [B, T, H, D] in v's dtype.
  """
  b, t, h, d = q_BxTxHxD.shape
  s, kv = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  scale = d ** -0.5 if scale is None else scale
  c = query_block(b, s, kv, d, t)
  pad = -t % c
  padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  q_seg = q_segments if q_segments is not None else jnp.ones((b, t), jnp.int32)
  k_seg = k_segments if k_segments is not None else jnp.ones((b, s), jnp.int32)
  blocks = [padded(x).reshape(b, -1, c, *x.shape[2:]).swapaxes(0, 1)
            for x in (q_BxTxHxD, inv_freq_BxTxR, q_pos, q_seg)]
  k_angles_pos = k_pos.astype(jnp.float32)

  def one_block(args):
    q, inv_freq, qp, qs = args                      # [B, c, H, D], [B, c, R/2], [B, c] ...
    q_rot = positional.rotate_by(q, qp.astype(jnp.float32)[..., None, None] * inv_freq[:, :, None])
    k_angles = k_angles_pos[:, None, :, None] * inv_freq[:, :, None, :]        # [B, c, S, R/2]
    k_rot = positional.rotate_by(k_BxSxKxD[:, None], k_angles[..., None, :])    # [B, c, S, K, D]
    logits = jnp.einsum('bckgd,bcskd->bkgcs', grouped(q_rot, kv), k_rot,
                        preferred_element_type=jnp.float32) * scale
    visible = mask.visible(qp, k_pos, qs, k_seg, kv_len=s)[:, None, None]
    probs = jax.nn.softmax(jnp.where(visible, logits, MASK_VALUE), axis=-1)
    out = jnp.einsum('bkgcs,bskd->bckgd', probs.astype(v_BxSxKxD.dtype), v_BxSxKxD)
    return out.reshape(b, c, h, d)

  out = jax.lax.map(one_block, blocks)                   # [T/c, B, c, H, D]
  return out.swapaxes(0, 1).reshape(b, -1, h, d)[:, :t]
