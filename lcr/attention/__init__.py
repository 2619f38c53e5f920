"""Scaled dot-product attention: one entry point, ``attend``, with backends chosen by name.

softmax(q·kᵀ/√d + bias) v (Vaswani et al. 2017 eq. 1) for multi-head, grouped-query (Ainslie et al.
2023) and multi-query (Shazeer 2019) attention, self- or cross-attention. Which keys a query sees
is a :class:`MaskSpec` evaluated on positions and segment ids, never an array passed in, so each
backend builds only the part it needs:

  * ``xla``     dense einsum; materialises the [B, H, T, S] logits.
  * ``chunked`` online softmax over key chunks in a scan over query chunks: O(T·chunk) memory,
                tiles outside the mask skipped, differentiable with rematerialisation.
  * ``cudnn``   cuDNN flash attention on NVIDIA GPUs (bf16/fp16).
  * ``splash``  Pallas splash attention on TPU (no bias; causal dense/sliding).
  * ``cpu_flash`` FlashAttention-2 tiling in a C++ kernel for CPUs (float32, no bias), via jax.ffi.
  * ``auto``    the fastest of these that supports the call on this platform (see ``select``).

With ``context_parallel`` = 'ring' or 'all_gather' and the sequence sharded over the mesh, the
call runs across devices (``lcr.attention.context_parallel``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcr.attention import context_parallel as cp
from lcr.attention.chunked import chunked_attention, tile_visits
from lcr.attention.dense import MASK_VALUE, xla_attention
from lcr.attention.masks import PATTERNS, MaskSpec, Span, mask_from_config, random_block, visible
from lcr.attention.select import AUTO_ORDER, BACKENDS, Call, choose, dtype_name, resolve
from lcr.attention.shifted import attend_shifted, half_head_specs
from lcr.positional import BiasFn

__all__ = ['attend', 'visible', 'length_scale', 'MaskSpec', 'mask_from_config', 'Span',
           'PATTERNS', 'BACKENDS', 'AUTO_ORDER', 'Call', 'choose', 'resolve', 'random_block',
           'tile_visits', 'chunked_attention', 'xla_attention', 'MASK_VALUE', 'half_head_specs']


def length_scale(q_pos_BxT: jax.Array, train_len: int) -> jax.Array:
  """[B, T] float32 logit multiplier max(1, log(p + 1) / log(train_len)) for a query at position p.

  Su 2021, "Entropy invariance and the scaling of attention" (kexue.fm/archives/8823): scaling
  q·k by log_L(n) keeps the attention entropy of an n-token context near that of the training
  length L; n is the number of tokens up to and including the query (p + 1). Clamped at 1 so
  nothing changes within the training length (Chiang & Cholak 2022 §5 scale by log n outright).
  """
  n = q_pos_BxT.astype(jnp.float32) + 1.0
  return jnp.maximum(1.0, jnp.log(n) / math.log(train_len))


def _mask_spec(mask: MaskSpec | None, causal: bool | None, window: int) -> MaskSpec:
  if mask is None:
    causal = True if causal is None else causal
    return MaskSpec('sliding' if window else 'dense', causal=causal, window=window)
  if window:
    raise ValueError('give the window inside the MaskSpec, not as attend(window=...)')
  if causal is not None and causal != mask.causal:
    raise ValueError(f'attend(causal={causal}) contradicts mask.causal={mask.causal}')
  return mask


def attend(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
           q_pos: jax.Array, k_pos: jax.Array, q_segments: jax.Array | None = None,
           k_segments: jax.Array | None = None, causal: bool | None = None,
           bias_fn: BiasFn | None = None, window: int = 0, scale: float | None = None,
           mask: MaskSpec | None = None, chunk: int = 512, length_scale_base: int = 0,
           backend: str = 'auto', context_parallel: str = 'none') -> jax.Array:
  """Attention of queries [B,T,H,D] over keys/values [B,S,K,D] (K divides H) → [B,T,H,D].

  q_pos/k_pos: [B,T]/[B,S] token positions; q_segments/k_segments: document ids (attention never
  crosses documents); bias_fn(q_pos, k_pos) → [B|1, H, T, S] additive logit bias, evaluated by
  each backend on the positions it needs; ``mask`` the visibility pattern (default: causal, or
  bidirectional with causal=False, limited to ``window`` positions back when window > 0 — a
  shorthand for MaskSpec('sliding')); ``causal`` must agree with ``mask.causal`` when both are
  given. Cross-attention: keys/values from another sequence and causal=False. scale defaults to
  1/√D; length_scale_base > 1 multiplies q·k by :func:`length_scale` with that training length.
  ``chunk``: tile size of the chunked backend. ``backend``: a name in BACKENDS, or 'auto'.
  ``context_parallel``: 'ring' or 'all_gather' runs across the devices that shard the sequence
  (the mesh axes the logical axis 'length' maps to), 'none' leaves the sharding to XLA.
  """
  b, t, h, d = q_BxTxHxD.shape
  s, kv = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  if h % kv:
    raise ValueError(f'{h} query heads are not a multiple of {kv} key/value heads')
  if q_pos.shape != (b, t) or k_pos.shape != (b, s):
    raise ValueError(f'positions {q_pos.shape}/{k_pos.shape} do not match q {q_BxTxHxD.shape} '
                     f'and k {k_BxSxKxD.shape}')
  spec = _mask_spec(mask, causal, window)
  if spec.pattern.shifts_half_heads:   # LongLoRA's S²-Attn: one call per half of the heads
    return attend_shifted(attend, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_pos=q_pos, k_pos=k_pos,
                          q_segments=q_segments, k_segments=k_segments, bias_fn=bias_fn,
                          scale=scale, mask=spec, chunk=chunk,
                          length_scale_base=length_scale_base, backend=backend,
                          context_parallel=context_parallel)
  scale = d ** -0.5 if scale is None else scale
  q_pos, k_pos = jnp.asarray(q_pos), jnp.asarray(k_pos)
  if length_scale_base:
    factor = length_scale(q_pos, length_scale_base)[:, :, None, None]
    q_BxTxHxD = (q_BxTxHxD.astype(jnp.float32) * factor).astype(q_BxTxHxD.dtype)
  if q_segments is not None and k_segments is not None:
    q_segments, k_segments = jnp.asarray(q_segments), jnp.asarray(k_segments)
  else:
    q_segments = k_segments = None

  def local(q, k, v, q_pos, k_pos, q_segments, k_segments, bias_fn):
    return _run_backend(backend, q, k, v, q_pos=q_pos, k_pos=k_pos, q_segments=q_segments,
                        k_segments=k_segments, mask=spec, bias_fn=bias_fn, scale=scale, chunk=chunk)

  axes = cp.sequence_axes() if context_parallel != 'none' else ()
  if axes:
    return cp.sharded_attend(context_parallel, axes, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
                             q_pos=q_pos, k_pos=k_pos, q_segments=q_segments,
                             k_segments=k_segments, mask=spec, bias_fn=bias_fn, scale=scale,
                             chunk=chunk, local=local)
  return local(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_pos, k_pos, q_segments, k_segments, bias_fn)


def _run_backend(backend: str, q, k, v, *, q_pos, k_pos, q_segments, k_segments, mask: MaskSpec,
                 bias_fn, scale, chunk) -> jax.Array:
  """One device's (or XLA-partitioned) attention through ``backend`` ('auto' resolved here)."""
  (b, t, h, d), s = q.shape, k.shape[1]
  mesh = jax.sharding.get_abstract_mesh()
  call = Call(platform=jax.default_backend(), dtype=dtype_name(q.dtype), batch=b, heads=h,
              head_dim=d, q_len=t, kv_len=s, has_bias=bias_fn is not None, mask=mask,
              devices=1 if mesh.empty else mesh.size)
  name = resolve(backend, call)
  return BACKENDS[name].fn(q, k, v, q_pos=q_pos, k_pos=k_pos, q_segments=q_segments,
                           k_segments=k_segments, mask=mask, bias_fn=bias_fn, scale=scale,
                           chunk=chunk)
