"""The ``chunked`` backend: exact attention in O(T·chunk) memory, in pure JAX (CPU, GPU, TPU).

Online softmax (Milakov & Gimelshein 2018) over key chunks inside a scan over query chunks, as in
Rabe & Staats 2021 ("Self-attention does not need O(n²) memory") and FlashAttention (Dao et al.
2022, Algorithm 1). Per tile of ``chunk`` queries × ``chunk`` keys it computes logits, the
positional bias (``bias_fn`` on the tile's positions) and the mask (``MaskSpec.visible`` on the
tile's positions and segment ids); no T×S array exists. A tile that ``MaskSpec.maybe_visible``
rules out from the position ranges of its two chunks is skipped with ``lax.cond`` — outside the
causal range, outside a window, between documents — which is exact for any positions and saves
the work whenever positions grow with the index (packed rows, contiguous windows).

Both loop bodies are rematerialised (``jax.checkpoint``), so the backward pass recomputes each
tile instead of storing its probabilities: memory stays O(T·chunk) for training too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcr.attention.dense import MASK_VALUE, grouped
from lcr.attention.masks import MaskSpec, Span


def _pad(x: jax.Array, length: int, mode: str = 'constant') -> jax.Array:
  """Pads axis 1 to ``length`` (zeros, or repeating the last entry with mode='edge')."""
  if x.shape[1] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, mode=mode)


def _chunks(x: jax.Array, size: int) -> jax.Array:
  """[B, N·size, ...] → [N, B, size, ...] (the scan axis first)."""
  b, n = x.shape[0], x.shape[1] // size
  return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)


def _span(pos_NxBxC: jax.Array, seg_NxBxC: jax.Array | None) -> Span:
  """Per chunk and batch row, the [N, B] range of positions and segment ids."""
  if seg_NxBxC is None:
    return Span(pos_NxBxC.min(-1), pos_NxBxC.max(-1))
  return Span(pos_NxBxC.min(-1), pos_NxBxC.max(-1), seg_NxBxC.min(-1), seg_NxBxC.max(-1))


def chunk_sizes(t: int, s: int, chunk: int) -> tuple[int, int]:
  """Query and key chunk sizes: ``chunk``, or the whole length when that is shorter."""
  return min(chunk, t), min(chunk, s)


def tile_visits(q_pos, k_pos, q_segments, k_segments, mask: MaskSpec, chunk: int) -> jax.Array:
  """[num_q_chunks, num_k_chunks] bool: which tiles the chunked backend computes (for tests)."""
  t, s = q_pos.shape[1], k_pos.shape[1]
  cq, ck = chunk_sizes(t, s, chunk)
  nq, nk = -(-t // cq), -(-s // ck)
  q_span = _span(_chunks(_pad(q_pos, nq * cq, 'edge'), cq),
                 None if q_segments is None else _chunks(_pad(q_segments, nq * cq, 'edge'), cq))
  k_span = _span(_chunks(_pad(k_pos, nk * ck, 'edge'), ck),
                 None if k_segments is None else _chunks(_pad(k_segments, nk * ck, 'edge'), ck))
  per_pair = jax.vmap(lambda qs: jax.vmap(
      lambda ks: mask.maybe_visible(qs, ks, kv_len=s, q_chunk=cq).any())(k_span))(q_span)
  return per_pair


def chunked_attention(q, k, v, *, q_pos, k_pos, q_segments, k_segments, mask: MaskSpec, bias_fn,
                      scale, chunk: int = 512):
  """Attention of q [B,T,H,D] over k, v [B,S,K,D] in tiles of ``chunk`` × ``chunk``.

  Lengths need not be multiples of ``chunk``: inputs are padded and padded keys masked. A query
  that sees no key at all gets a zero output (the ``xla`` backend averages all values instead).
  """
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  cq, ck = chunk_sizes(t, s, chunk)
  nq, nk = -(-t // cq), -(-s // ck)
  segmented = q_segments is not None and k_segments is not None

  def pad_chunks(x, n, c, mode='constant'):
    return _chunks(_pad(x, n * c, mode), c)

  q_c = pad_chunks(grouped(q, kv), nq, cq)                   # [nq, B, cq, K, G, D]
  k_c, v_c = pad_chunks(k, nk, ck), pad_chunks(v, nk, ck)    # [nk, B, ck, K, D]
  qp_c, kp_c = pad_chunks(q_pos, nq, cq, 'edge'), pad_chunks(k_pos, nk, ck, 'edge')
  qs_c = pad_chunks(q_segments, nq, cq, 'edge') if segmented else None
  ks_c = pad_chunks(k_segments, nk, ck, 'edge') if segmented else None
  k_valid = (jnp.arange(nk * ck) < s).reshape(nk, 1, ck)     # padded keys are never visible
  q_span, k_span = _span(qp_c, qs_c), _span(kp_c, ks_c)

  def tile(carry, q_blk, qp, qs, k_blk, v_blk, kp, ks, valid):
    """One online-softmax update (FlashAttention Algorithm 1, lines 9-12) with one key tile."""
    m, l, acc = carry                                        # [B,K,G,cq], same, [B,K,G,cq,D]
    logits = jnp.einsum('bqkgd,bskd->bkgqs', q_blk, k_blk,
                        preferred_element_type=jnp.float32) * scale
    if bias_fn is not None:
      logits = logits + jnp.broadcast_to(bias_fn(qp, kp), (b, h, cq, ck)).reshape(logits.shape)
    ok = mask.visible(qp, kp, qs, ks, kv_len=s) & valid[:, None, :]
    ok = ok[:, None, None]                                   # [B, 1, 1, cq, ck]
    logits = jnp.where(ok, logits, MASK_VALUE)
    m_new = jnp.maximum(m, logits.max(-1))
    correction = jnp.exp(m - m_new)
    p = jnp.where(ok, jnp.exp(logits - m_new[..., None]), 0.0)
    l = l * correction + p.sum(-1)
    pv = jnp.einsum('bkgqs,bskd->bkgqd', p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=jnp.float32)
    return m_new, l, acc * correction[..., None] + pv

  @functools.partial(jax.checkpoint, prevent_cse=False)   # safe inside scan (JAX docs)
  def query_chunk(q_blk, qp, qs, q_sp):
    def key_step(carry, xs):
      k_blk, v_blk, kp, ks, valid, k_sp = xs
      needed = mask.maybe_visible(q_sp, k_sp, kv_len=s, q_chunk=cq).any()
      compute = functools.partial(tile, q_blk=q_blk, qp=qp, qs=qs, k_blk=k_blk, v_blk=v_blk,
                                  kp=kp, ks=ks, valid=valid)
      carry = lax.cond(needed, compute, lambda c: c, carry)
      return carry, None

    g = h // kv
    init = (jnp.full((b, kv, g, cq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kv, g, cq), jnp.float32), jnp.zeros((b, kv, g, cq, d), jnp.float32))
    (_, l, acc), _ = lax.scan(jax.checkpoint(key_step, prevent_cse=False), init,
                              (k_c, v_c, kp_c, ks_c, k_valid, k_span))
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]         # [B, K, G, cq, D]
    return jnp.moveaxis(out, 3, 1).reshape(b, cq, h, d).astype(v.dtype)

  out_c = lax.map(lambda xs: query_chunk(*xs), (q_c, qp_c, qs_c, q_span))  # [nq, B, cq, H, D]
  return jnp.moveaxis(out_c, 0, 1).reshape(b, nq * cq, h, d)[:, :t]
