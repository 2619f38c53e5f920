"""Accelerator kernels: cuDNN flash attention (NVIDIA GPUs) and splash attention (TPU).

Both take masks by index, not by position, so each is wrapped to stay exact:
  * ``cudnn`` gets the mask (folded into the additive bias when there is one) materialised from
    positions — B·T·S (or B·H·T·S) values, which ``auto`` only accepts while they are small;
  * ``splash`` takes its causal / local masks by index, which equals the positional mask when
    positions rise by exactly one per token inside each document and documents are contiguous
    runs of increasing segment ids (packed rows, plain windows). That is checked at run time;
    any other input goes through the ``chunked`` backend instead (``lax.cond``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lcr.attention.chunked import _pad, chunked_attention
from lcr.attention.masks import MaskSpec

# cuDNN's own large negative numbers for masked logits (jax._src.cudnn.fused_attention_stablehlo).
_CUDNN_NEG = {jnp.dtype(jnp.bfloat16): -2.0 ** 41, jnp.dtype(jnp.float16): -2.0 ** 15}
SPLASH_BLOCK = 128          # splash's default tile; lengths are padded to a multiple of it


def cudnn_attention(q, k, v, *, q_pos, k_pos, q_segments, k_segments, mask: MaskSpec, bias_fn,
                    scale, chunk):
  """``jax.nn.dot_product_attention(implementation='cudnn')`` with the mask as a bias array.

  Lengths are padded to even (cuDNN's bias gradient needs even lengths); padded keys are masked.
  Causal self-attention without a logit bias takes cuDNN's own causal mask instead, with no
  array at all, whenever every row is one document whose positions rise by one (checked on
  device, ``lax.cond``): then the mask by index is the mask by position.
  """
  del chunk
  b, t, h, _ = q.shape
  s = k.shape[1]
  causal_shape = bias_fn is None and mask.kind == 'dense' and mask.causal and t == s
  one_document = causal_shape and one_document_per_row(q_pos, k_pos, q_segments, k_segments)
  tp, sp = t + t % 2, s + s % 2
  q, k, v = _pad(q, tp), _pad(k, sp), _pad(v, sp)
  q_pos, k_pos = _pad(q_pos, tp, 'edge'), _pad(k_pos, sp, 'edge')
  if q_segments is not None and k_segments is not None:
    q_segments, k_segments = _pad(q_segments, tp, 'edge'), _pad(k_segments, sp, 'edge')

  def with_bias(q, k, v):
    ok = mask.visible(q_pos, k_pos, q_segments, k_segments, kv_len=s)
    ok = (ok & (jnp.arange(sp) < s)[None, None, :])[:, None]             # [B, 1, T, S]
    neg = _CUDNN_NEG[jnp.dtype(q.dtype)]
    if bias_fn is None:
      bias = jnp.where(ok, 0.0, neg).astype(q.dtype)
    else:
      bias = jnp.broadcast_to(bias_fn(q_pos, k_pos), (b, h, tp, sp))
      bias = jnp.where(ok, bias, neg).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation='cudnn')

  def causal(q, k, v):   # padded keys come after every real query: the causal mask hides them
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation='cudnn')

  if not causal_shape:
    return with_bias(q, k, v)[:, :t]
  return lax.cond(one_document, causal, with_bias, q, k, v)[:, :t]


def one_document_per_row(q_pos, k_pos, q_segments, k_segments) -> jax.Array:
  """Scalar bool: queries are the keys, one document per row, positions rising by one — so the
  causal mask by index equals the one by position."""
  ok = index_masks_apply(q_pos, k_pos, q_segments, k_segments)
  if q_segments is not None and k_segments is not None:
    ok &= jnp.all(q_segments == q_segments[:, :1])
  return ok


def index_masks_apply(q_pos, k_pos, q_segments, k_segments) -> jax.Array:
  """Scalar bool: do index-based causal/local masks equal the positional ones for this input?

  True when queries and keys are the same tokens, and along each row positions rise by exactly
  one inside a document and segment ids only ever increase (each document is one contiguous run).
  """
  if q_pos.shape != k_pos.shape:
    return jnp.asarray(False)
  ok = jnp.all(q_pos == k_pos)
  step = q_pos[:, 1:] - q_pos[:, :-1]
  if q_segments is None or k_segments is None:
    return ok & jnp.all(step == 1)
  same = q_segments[:, 1:] == q_segments[:, :-1]
  ok &= jnp.all(q_segments == k_segments)
  return ok & jnp.all(jnp.where(same, step == 1, q_segments[:, 1:] > q_segments[:, :-1]))


def splash_supports(mask: MaskSpec, has_bias: bool, q_len: int, kv_len: int) -> str | None:
  """None if splash can run this configuration, else why not."""
  if has_bias:
    return 'splash attention takes no additive bias (ALiBi, T5)'
  if mask.kind not in ('dense', 'sliding') or not mask.causal:
    return f'splash runs causal dense/sliding masks only, not {mask.kind} (causal={mask.causal})'
  if q_len != kv_len:
    return 'splash runs self-attention only (as many queries as keys)'
  return None


def _splash_kernel(mask: MaskSpec, length: int, heads: int, mqa: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (length, length)
  if mask.kind == 'sliding':
    one = sm.LocalMask(shape, (mask.window - 1, 0), offset=0)
  else:
    one = sm.CausalMask(shape)
  make = sk.make_splash_mqa_single_device if mqa else sk.make_splash_mha_single_device
  kernel = make(sm.MultiHeadMask([one] * heads), interpret=jax.default_backend() != 'tpu')
  return kernel, sk.SegmentIds


def splash_attention(q, k, v, *, q_pos, k_pos, q_segments, k_segments, mask: MaskSpec, bias_fn,
                     scale, chunk):
  """TPU splash attention (Pallas) for causal dense/sliding masks, exact via a run-time check.

  Off TPU the kernel runs in Pallas interpret mode (slow; for tests).
  """
  why = splash_supports(mask, bias_fn is not None, q.shape[1], k.shape[1])
  if why:
    raise ValueError(why)
  b, t, h, d = q.shape
  kv = k.shape[2]
  g = h // kv
  tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
  kernel, segment_ids = _splash_kernel(mask, tp, g if kv < h else h, mqa=kv < h)

  def run(q, k, v):
    # Padded tokens sit after every real one, so the causal index mask hides them.
    qs = (_pad(q, tp) * jnp.asarray(scale, q.dtype)).reshape(b, tp, kv, g, d)
    ks, vs = _pad(k, tp), _pad(v, tp)
    seg = None if q_segments is None else _pad(q_segments, tp, 'edge').astype(jnp.int32)
    if kv < h:   # per K/V head, its G query heads against one key/value sequence (MQA kernel)
      per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))           # over K/V heads
      fn = lambda q1, k1, v1, s1: per_head(
          jnp.moveaxis(q1, 0, 2), jnp.moveaxis(k1, 0, 1), jnp.moveaxis(v1, 0, 1),
          None if s1 is None else segment_ids(s1, s1))              # → [K, G, T, D]
      out = jax.vmap(fn)(qs, ks, vs, seg)                              # [B, K, G, T, D]
      out = jnp.moveaxis(out, 3, 1)
    else:
      fn = lambda q1, k1, v1, s1: kernel(
          jnp.moveaxis(q1[:, :, 0], 0, 1), jnp.moveaxis(k1, 0, 1), jnp.moveaxis(v1, 0, 1),
          None if s1 is None else segment_ids(s1, s1))              # → [H, T, D]
      out = jnp.moveaxis(jax.vmap(fn)(qs, ks, vs, seg), 2, 1)
    return out.reshape(b, tp, h, d)[:, :t].astype(v.dtype)

  def fallback(q, k, v):
    return chunked_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, q_segments=q_segments,
                             k_segments=k_segments, mask=mask, bias_fn=None, scale=scale,
                             chunk=chunk)

  return lax.cond(index_masks_apply(q_pos, k_pos, q_segments, k_segments), run, fallback,
                  q, k, v)


def cudnn_bytes(batch: int, heads: int, q_len: int, kv_len: int, has_bias: bool) -> int:
  """Bytes of the mask/bias array the cudnn backend materialises (2-byte dtype)."""
  return 2 * batch * (heads if has_bias else 1) * (q_len + q_len % 2) * (kv_len + kv_len % 2)

