"""Ring attention (Liu, Zaharia & Abbeel 2023): exact attention over a sequence sharded on a ring.

Runs inside ``shard_map`` on one device's share of the sequence. Each device keeps its queries
and passes its block of keys and values (with their positions and segment ids) to the next device
with ``lax.ppermute``; after ``cp`` steps every query has seen every key. Each step folds one
block into the running softmax statistics (online softmax, Milakov & Gimelshein 2018;
FlashAttention, Dao et al. 2022, Alg. 1): per query the running max m, the sum l = Σ exp(s − m)
and the unnormalised output Σ exp(s − m)·v. The block itself is computed in tiles of at most
``chunk`` × ``chunk``; a tile no query of which may see any of its keys (``MaskSpec.maybe_visible``
on the tile's position ranges) is skipped, so causal and windowed attention do not pay for the
masked part.

The backward pass (``jax.custom_vjp``) stores only the output O and the row log-sum-exp L and
goes round the ring once more, recomputing each tile (FlashAttention Alg. 4, Dao et al. 2022; the
ring form of Liu et al. 2023 §3): with P = exp(S − L) and Δ = rowsum(dO ⊙ O),

    dV_j += Pᵀ·dO,   dS = P ⊙ (dO·V_jᵀ − Δ),   dQ += dS·K_j·scale,   dK_j += dSᵀ·Q·scale.

dK_j and dV_j travel with K_j and V_j, so after ``cp`` rotations each device holds the gradient of
its own keys and values. A logit bias (ALiBi, T5) comes as ``bias_fn(q_pos, k_pos, *consts)``
with its learned parameters as explicit ``consts``, whose gradient is summed over the ring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lcr.attention.dense import MASK_VALUE, grouped
from lcr.attention.masks import MaskSpec, Span


@dataclasses.dataclass(frozen=True)
class Ring:
  """What is fixed for one ring-attention call (none of it traced)."""
  axes: tuple[str, ...]      # the mesh axes the sequence is sharded over (the ring)
  size: int                  # devices on the ring (cp)
  mask: MaskSpec
  scale: float
  kv_len: int                # keys over the whole ring (bidirectional bigbird needs it)
  q_tile: int
  k_tile: int
  bias_fn: Callable[..., jax.Array] | None   # (q_pos, k_pos, *consts) → [B|1, H, T, S]

  def zeros(self, shape) -> jax.Array:
    """float32 zeros that differ per device (shard_map's varying type), for loop carries."""
    return lax.pcast(jnp.zeros(shape, jnp.float32), self.axes, to='varying')

  def rotate(self, tree):
    """Every array of ``tree`` to the next device on the ring (i → i + 1 mod cp)."""
    perm = [(i, (i + 1) % self.size) for i in range(self.size)]
    return jax.tree.map(lambda x: lax.ppermute(x, self.axes, perm), tree)


def tile_size(length: int, chunk: int) -> int:
  """The largest divisor of ``length`` that is at most ``chunk`` (tiles never need padding)."""
  return max(d for d in range(1, min(length, chunk) + 1) if length % d == 0)


def _tiles(x: jax.Array, size: int) -> jax.Array:
  """[B, N·size, ...] → [N, B, size, ...]."""
  b, n = x.shape[0], x.shape[1] // size
  return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)


def _untile(x: jax.Array) -> jax.Array:
  """[N, B, size, ...] → [B, N·size, ...]."""
  n, b, size = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * size, *x.shape[3:])


def _span(pos_NxBxC, seg_NxBxC) -> Span:
  return Span(pos_NxBxC.min(-1), pos_NxBxC.max(-1), seg_NxBxC.min(-1), seg_NxBxC.max(-1))


def _key_tiles(ring: Ring, k, v, k_pos, k_seg):
  kp, ks = _tiles(k_pos, ring.k_tile), _tiles(k_seg, ring.k_tile)
  return _tiles(k, ring.k_tile), _tiles(v, ring.k_tile), kp, ks, _span(kp, ks)


def _logits(ring: Ring, q_i, k_j, qp, kp, qs, ks, consts):
  """Scaled logits [B, K, G, cq, ck] (float32, bias added) and the visibility mask."""
  b, cq, kv, g, _ = q_i.shape
  ck = k_j.shape[1]
  s = jnp.einsum('bqkgd,bskd->bkgqs', q_i, k_j, preferred_element_type=jnp.float32) * ring.scale
  if ring.bias_fn is not None:
    s = s + _bias(ring, qp, kp, consts, (b, kv, g, cq, ck))
  ok = ring.mask.visible(qp, kp, qs, ks, kv_len=ring.kv_len)[:, None, None]
  return s, ok


def _bias(ring: Ring, qp, kp, consts, shape):
  b, kv, g, cq, ck = shape
  bias = ring.bias_fn(qp, kp, *consts).astype(jnp.float32)
  return jnp.broadcast_to(bias, (b, kv * g, cq, ck)).reshape(shape)


def _needed(ring: Ring, q_span: Span, k_span: Span) -> jax.Array:
  return ring.mask.maybe_visible(q_span, k_span, kv_len=ring.kv_len, q_chunk=ring.q_tile).any()


# ----------------------------------------------------------------------------------------------
# Forward: fold one visiting block of keys into the running statistics of every query tile.


def _fold_tile(ring: Ring, stats, q_i, qp, qs, k_j, v_j, kp, ks, consts):
  """FlashAttention Alg. 1, lines 9-12, for one (query tile, key tile) pair."""
  m, l, acc = stats                                          # [B,K,G,cq] ×2, [B,K,G,cq,D]
  s, ok = _logits(ring, q_i, k_j, qp, kp, qs, ks, consts)
  s = jnp.where(ok, s, MASK_VALUE)
  m_new = jnp.maximum(m, s.max(-1))
  correction = jnp.exp(m - m_new)
  p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
  pv = jnp.einsum('bkgqs,bskd->bkgqd', p.astype(v_j.dtype), v_j,
                  preferred_element_type=jnp.float32)
  return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv


def _fold_block(ring: Ring, stats, q_tiles, keys, consts):
  """Running statistics of every query tile after the key/value block ``keys``."""
  k_t, v_t, kp_t, ks_t, k_span = _key_tiles(ring, *keys)

  def per_query_tile(args):
    tile_stats, q_i, qp, qs, q_span = args

    def key_step(carry, xs):
      k_j, v_j, kp, ks, span = xs
      fold = lambda c: _fold_tile(ring, c, q_i, qp, qs, k_j, v_j, kp, ks, consts)
      return lax.cond(_needed(ring, q_span, span), fold, lambda c: c, carry), None

    return lax.scan(key_step, tile_stats, (k_t, v_t, kp_t, ks_t, k_span))[0]

  return lax.map(per_query_tile, (stats, *q_tiles))


def _query_tiles(ring: Ring, q, q_pos, q_seg):
  """(q [nq, B, cq, K, G, D], positions, segment ids, spans) of this device's queries."""
  qp, qs = _tiles(q_pos, ring.q_tile), _tiles(q_seg, ring.q_tile)
  return _tiles(q, ring.q_tile), qp, qs, _span(qp, qs)


def _forward(ring: Ring, q, k, v, q_pos, k_pos, q_seg, k_seg, consts):
  """(output [B, T, K, G, D] in v's dtype, row log-sum-exp [nq, B, K, G, cq] float32)."""
  q_tiles = _query_tiles(ring, q, q_pos, q_seg)
  nq, b, cq, kv, g, d = q_tiles[0].shape
  init = (ring.zeros((nq, b, kv, g, cq)) + MASK_VALUE, ring.zeros((nq, b, kv, g, cq)),
          ring.zeros((nq, b, kv, g, cq, d)))

  def ring_step(carry, _):
    stats, keys = carry
    return (_fold_block(ring, stats, q_tiles, keys, consts), ring.rotate(keys)), None

  (stats, _), _ = lax.scan(ring_step, (init, (k, v, k_pos, k_seg)), None, length=ring.size)
  m, l, acc = stats
  seen = l > 0                                               # a query with no visible key: 0
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
  out = jnp.moveaxis(out, -2, 2)                             # [nq, B, cq, K, G, D]
  return _untile(out).astype(v.dtype), lse


# ----------------------------------------------------------------------------------------------
# Backward: the same ring once more; dK and dV travel with their block and arrive home.


def _tile_grads(ring: Ring, q_i, qp, qs, do_i, lse_i, delta_i, k_j, v_j, kp, ks, consts):
  """(dq_i, dk_j, dv_j, dconsts) of one tile pair (FlashAttention Alg. 4, lines 11-20)."""
  s, ok = _logits(ring, q_i, k_j, qp, kp, qs, ks, consts)
  p = jnp.where(ok, jnp.exp(s - lse_i[..., None]), 0.0)      # [B, K, G, cq, ck]
  dv = jnp.einsum('bkgqs,bqkgd->bskd', p, do_i, preferred_element_type=jnp.float32)
  dp = jnp.einsum('bqkgd,bskd->bkgqs', do_i, v_j, preferred_element_type=jnp.float32)
  ds = p * (dp - delta_i[..., None])
  dq = jnp.einsum('bkgqs,bskd->bqkgd', ds, k_j, preferred_element_type=jnp.float32) * ring.scale
  dk = jnp.einsum('bkgqs,bqkgd->bskd', ds, q_i, preferred_element_type=jnp.float32) * ring.scale
  dconsts = ()
  if ring.bias_fn is not None and consts:
    _, bias_vjp = jax.vjp(lambda *c: _bias(ring, qp, kp, c, ds.shape), *consts)
    dconsts = tuple(x.astype(jnp.float32) for x in bias_vjp(ds))
  return dq, dk, dv, dconsts


def _block_grads(ring: Ring, q_tiles, grad_tiles, keys, consts, dconsts):
  """(dq [nq, B, cq, K, G, D], dk, dv [B, S, K, D], dconsts) of this device's queries against
  the visiting block: a scan over key tiles, each a scan over query tiles."""
  k_t, v_t, kp_t, ks_t, k_span = _key_tiles(ring, *keys)
  q_t, qp_t, qs_t, q_span = q_tiles
  zero_dq = ring.zeros(q_t.shape[1:])

  def per_key_tile(carry, xs):
    dq_sum, dc = carry
    k_j, v_j, kp, ks, span = xs

    def query_step(c, ys):
      q_i, qp_i, qs_i, span_i, do_i, lse_i, delta_i = ys

      def grads(c):
        dk, dv, dc = c
        dq, dk_t, dv_t, dc_t = _tile_grads(ring, q_i, qp_i, qs_i, do_i, lse_i, delta_i, k_j, v_j,
                                           kp, ks, consts)
        return (dk + dk_t, dv + dv_t, jax.tree.map(jnp.add, dc, dc_t)), dq

      return lax.cond(_needed(ring, span_i, span), grads, lambda c: (c, zero_dq), c)

    init = (ring.zeros(k_j.shape), ring.zeros(v_j.shape), dc)
    (dk, dv, dc), dq = lax.scan(query_step, init, (q_t, qp_t, qs_t, q_span, *grad_tiles))
    return (dq_sum + dq, dc), (dk, dv)

  (dq, dconsts), (dk, dv) = lax.scan(per_key_tile, (ring.zeros(q_t.shape), dconsts),
                                     (k_t, v_t, kp_t, ks_t, k_span))
  return dq, _untile(dk), _untile(dv), dconsts


def _backward(ring: Ring, residuals, d_out):
  q, k, v, q_pos, k_pos, q_seg, k_seg, consts, out, lse = residuals
  q_tiles = _query_tiles(ring, q, q_pos, q_seg)
  do_t = _tiles(d_out, ring.q_tile)                          # [nq, B, cq, K, G, D]
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)   # [B, T, K, G]
  delta_t = jnp.moveaxis(_tiles(delta, ring.q_tile), 2, -1)  # [nq, B, K, G, cq]
  grad_tiles = (do_t, lse, delta_t)
  dconsts0 = tuple(ring.zeros(c.shape) for c in consts)

  def ring_step(carry, _):
    dq, dconsts, keys, dk, dv = carry
    dq_b, dk_b, dv_b, dconsts = _block_grads(ring, q_tiles, grad_tiles, keys, consts, dconsts)
    keys, (dk, dv) = ring.rotate((keys, (dk + dk_b, dv + dv_b)))
    return (dq + dq_b, dconsts, keys, dk, dv), None

  init = (ring.zeros(q_tiles[0].shape), dconsts0, (k, v, k_pos, k_seg), ring.zeros(k.shape),
          ring.zeros(v.shape))
  (dq, dconsts, _, dk, dv), _ = lax.scan(ring_step, init, None, length=ring.size)
  dconsts = tuple(dc.astype(c.dtype) for dc, c in zip(dconsts, consts))
  return (_untile(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None, None, None, None, dconsts)


def ring_attention(ring: Ring, q, k, v, q_pos, k_pos, q_seg, k_seg,
                   consts: Sequence[jax.Array] = ()) -> jax.Array:
  """This device's attention output [B, T, H, D] of queries q [B, T, H, D] over the keys and
  values of the whole ring; k, v [B, S, K, D] are this device's block (S = T for self-attention).
  Positions and segment ids are this device's, in the same (possibly permuted) order as the
  tokens."""
  b, t, h, d = q.shape
  kv = k.shape[2]

  @jax.custom_vjp
  def attend(q, k, v, q_pos, k_pos, q_seg, k_seg, consts):
    return _forward(ring, q, k, v, q_pos, k_pos, q_seg, k_seg, consts)[0]

  def forward(q, k, v, q_pos, k_pos, q_seg, k_seg, consts):
    out, lse = _forward(ring, q, k, v, q_pos, k_pos, q_seg, k_seg, consts)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, consts, out, lse)

  attend.defvjp(forward, lambda res, g: _backward(ring, res, g))
  # The bias parameters are the same on every device; marked as varying here, so that their
  # gradient (each device's share) is summed over the ring by the transpose of the cast.
  consts = tuple(lax.pcast(c, ring.axes, to='varying') for c in consts)
  out = attend(grouped(q, kv), k, v, q_pos, k_pos, q_seg, k_seg, consts)
  return out.reshape(b, t, h, d)
