"""The attention pattern of a segment with memory, registered in lcr.attention's pattern registry.

Transformer-XL (Dai et al. 2019 §3.2) splits a stream into segments of S tokens; a token attends
to its own segment up to itself and to the M hidden states before the segment's start (the
memory). On positions: query p sees key r when (p // S)·S − M ≤ r ≤ p. With M = 0 that is attention
within the segment alone, Infini-attention's local attention (Munkhdalai et al. 2024 §2.1.1).

``MaskSpec('xl', block=S, window=M)``; every backend evaluates it from positions, like the other
patterns of lcr.attention.masks (the chunked backend skips tiles by :func:`_maybe`).
"""

from __future__ import annotations

import jax

from lcr.attention import masks

KIND = 'xl'


def _allowed(spec: masks.MaskSpec, q_pos, k_pos, kv_len) -> jax.Array:
  del kv_len
  return k_pos >= (q_pos // spec.block) * spec.block - spec.window


def _maybe(spec: masks.MaskSpec, q: masks.Span, k: masks.Span, kv_len, q_chunk) -> jax.Array:
  del kv_len, q_chunk
  return k.pos_hi >= (q.pos_lo // spec.block) * spec.block - spec.window


PATTERN = masks.Pattern(KIND, 'segment + memory, Dai et al. 2019 (Transformer-XL) §3.2', ('block',),
                        _allowed, _maybe)
masks.PATTERNS.setdefault(KIND, PATTERN)


def spec(segment_length: int, memory_length: int) -> masks.MaskSpec:
  """Causal attention within the segment and over the ``memory_length`` positions before it."""
  return masks.MaskSpec(KIND, causal=True, block=segment_length, window=memory_length)
