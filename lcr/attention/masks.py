"""Which keys each query may see: attention patterns as functions of positions and segment ids.

Every pattern is defined on token *positions* (and document ids), never on a stored T×S array, so
each backend evaluates it on the part it needs (the ``chunked`` backend per [chunk, chunk] tile).
Two functions per pattern:

  * ``allowed``: exact, elementwise — may query position p see key position r?
  * ``maybe``:   a sound over-approximation for a whole tile from the position range of its query
                 chunk and key chunk: False only when no pair in the tile is allowed, so a backend
                 may skip that tile. It is exact enough to skip every tile outside a causal or
                 window range when positions grow with the index.

On top of every pattern: ``causal`` (key position ≤ query position) and, when segment ids are
given, same document. Blocks are ``position // block``; global and sink tokens are the first
tokens *of each document* (position < n), so packing needs no extra input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Span(NamedTuple):
  """Position (and segment id) range of one chunk per batch row, [B] arrays; seg_* may be None."""
  pos_lo: jax.Array
  pos_hi: jax.Array
  seg_lo: jax.Array | None = None
  seg_hi: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Pattern:
  name: str
  paper: str
  needs: tuple[str, ...]                      # MaskSpec fields that must be > 0
  allowed: Callable[..., jax.Array]           # (spec, q_pos, k_pos, kv_len) -> bool, broadcast
  maybe: Callable[..., jax.Array]             # (spec, q: Span, k: Span, kv_len, q_chunk) -> [B]
  # Head-dependent: ``attend`` runs the first half of the heads as 'grouped' with shift 0 and the
  # second half with shift block // 2 (LongLoRA's S²-Attn), so no backend sees this kind itself.
  shifts_half_heads: bool = False


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """An attention pattern: ``kind`` from :data:`PATTERNS` and the sizes it reads.

  kind:          'dense' | 'sliding' | 'longformer' | 'bigbird' | 'sinks' | 'blockwise' | 'grouped'
                 | 'shifted_sparse'
  causal:        keys at later positions are never visible (decoder self-attention).
  window:        sliding/longformer/sinks: tokens back (causal: 0 ≤ p − r < window;
                 bidirectional: |p − r| < window).
  global_tokens: longformer/bigbird: the first n tokens of each document see and are seen by all.
  sink_tokens:   sinks: the first n tokens of each document are always visible.
  block:         bigbird/blockwise block size in positions (block id = position // block);
                 grouped/shifted_sparse group size.
  random_blocks: bigbird: random key blocks per query block, drawn by :func:`random_block`.
  seed:          bigbird: seed of the random pattern (fixed, so every step sees the same one).
  shift:         grouped: group id = (position − shift) // block.
  """
  kind: str = 'dense'
  causal: bool = True
  window: int = 0
  global_tokens: int = 0
  sink_tokens: int = 0
  block: int = 0
  random_blocks: int = 0
  seed: int = 0
  shift: int = 0

  def __post_init__(self):
    if self.kind not in PATTERNS:
      raise ValueError(f'unknown attention pattern {self.kind!r}; known: {sorted(PATTERNS)}')
    for name in ('window', 'global_tokens', 'sink_tokens', 'block', 'random_blocks', 'shift'):
      if getattr(self, name) < 0:
        raise ValueError(f'MaskSpec.{name} must be >= 0, got {getattr(self, name)}')
    for name in PATTERNS[self.kind].needs:
      if getattr(self, name) <= 0:
        raise ValueError(f'attention pattern {self.kind!r} needs MaskSpec.{name} > 0')

  @property
  def pattern(self) -> Pattern:
    return PATTERNS[self.kind]

  def visible(self, q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, q_seg_BxT: jax.Array | None = None,
              k_seg_BxS: jax.Array | None = None, *, kv_len: int | None = None) -> jax.Array:
    """[B, T, S] bool: may query i see key j? ``kv_len``: total keys (non-causal bigbird only)."""
    q_pos, k_pos = q_pos_BxT[:, :, None], k_pos_BxS[:, None, :]
    ok = self.pattern.allowed(self, q_pos, k_pos, kv_len)
    if self.causal:
      ok &= k_pos <= q_pos
    if q_seg_BxT is not None and k_seg_BxS is not None:
      ok &= q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]
    return ok

  def maybe_visible(self, q: Span, k: Span, *, kv_len: int | None = None,
                    q_chunk: int = 1) -> jax.Array:
    """[B] bool, False only if no (query, key) pair of the two chunks is visible.

    ``q_chunk`` (queries per chunk) bounds how many bigbird blocks a contiguous chunk spans.
    """
    ok = self.pattern.maybe(self, q, k, kv_len, q_chunk)
    if self.causal:
      ok &= k.pos_lo <= q.pos_hi
    if q.seg_lo is not None and k.seg_lo is not None:
      ok &= (q.seg_lo <= k.seg_hi) & (k.seg_lo <= q.seg_hi)
    return ok


def visible(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, q_seg_BxT: jax.Array | None,
            k_seg_BxS: jax.Array | None, *, causal: bool = True, window: int = 0,
            mask: MaskSpec | None = None, kv_len: int | None = None) -> jax.Array:
  """[B, T, S] bool from positions: ``mask`` if given, else causal/full with an optional window."""
  if mask is None:
    mask = MaskSpec('sliding' if window else 'dense', causal=causal, window=window)
  return mask.visible(q_pos_BxT, k_pos_BxS, q_seg_BxT, k_seg_BxS, kv_len=kv_len)


# ----------------------------------------------------------------------------------------------
# Building blocks. `lo`/`hi` below are bounds of p − r (query minus key position) over a tile.


def _within_window(spec: MaskSpec, d):
  """0 ≤ d < window when causal (the causal term adds d ≥ 0), else |d| < window."""
  return (d < spec.window) if spec.causal else (jnp.abs(d) < spec.window)


def _window_maybe(spec: MaskSpec, q: Span, k: Span):
  d_lo, d_hi = q.pos_lo - k.pos_hi, q.pos_hi - k.pos_lo
  return (d_lo < spec.window) & (d_hi > -spec.window)


def _block_near(spec: MaskSpec, q_blk, k_blk):
  """Key block is the query's block or the one before it (or after it, when bidirectional)."""
  diff = q_blk - k_blk
  return (diff <= 1) & (diff >= (0 if spec.causal else -1))


def _block_near_maybe(spec: MaskSpec, q: Span, k: Span):
  b = spec.block
  diff_lo, diff_hi = q.pos_lo // b - k.pos_hi // b, q.pos_hi // b - k.pos_lo // b
  return (diff_lo <= 1) & (diff_hi >= (0 if spec.causal else -1))


def _is_global(spec: MaskSpec, q_pos, k_pos):
  return (k_pos < spec.global_tokens) | (q_pos < spec.global_tokens)


def _global_maybe(spec: MaskSpec, q: Span, k: Span):
  return (k.pos_lo < spec.global_tokens) | (q.pos_lo < spec.global_tokens)


def _fmix32(x):
  """MurmurHash3's 32-bit finaliser (Appleby 2011): a bijective avalanche on uint32."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
  """:func:`_fmix32` of a Python int (the seed), masked to 32 bits."""
  x &= 0xFFFFFFFF
  x ^= x >> 16
  x = (x * 0x85EBCA6B) & 0xFFFFFFFF
  x ^= x >> 13
  x = (x * 0xC2B2AE35) & 0xFFFFFFFF
  return x ^ (x >> 16)


def random_block(seed: int, q_block, draw: int, num_choices):
  """The ``draw``-th random key block of query block ``q_block``: an integer in [0, num_choices).

  h = fmix32(fmix32(q_block · 2654435761 + draw) ⊕ fmix32(seed)), block = h mod num_choices, in
  uint32 arithmetic: a counter-based hash, so the pattern is defined for any length, never
  stored, and the same on every backend. Works on NumPy and JAX arrays alike.
  """
  xp = jnp if isinstance(q_block, jax.Array) else np
  q_block = xp.asarray(q_block).astype(xp.uint32)
  h = _fmix32(q_block * np.uint32(2654435761) + np.uint32(draw)) ^ np.uint32(_fmix32_int(seed))
  h = _fmix32(h)
  return (h % xp.asarray(num_choices).astype(xp.uint32)).astype(xp.int32)


def _random_choices(spec: MaskSpec, q_blk, kv_len):
  """Blocks a random draw picks from: causal [0, q_blk]; bidirectional [0, ceil(kv_len/block))."""
  if spec.causal:
    return jnp.maximum(q_blk + 1, 1)
  if kv_len is None:
    raise ValueError('a bidirectional bigbird pattern needs kv_len (the number of keys)')
  return jnp.full_like(q_blk, -(-kv_len // spec.block))


def _random_hit(spec: MaskSpec, q_blk, k_blk, kv_len):
  choices = _random_choices(spec, q_blk, kv_len)
  hit = jnp.zeros(jnp.broadcast_shapes(q_blk.shape, k_blk.shape), bool)
  for m in range(spec.random_blocks):
    hit |= k_blk == random_block(spec.seed, q_blk, m, choices)
  return hit


def _random_maybe(spec: MaskSpec, q: Span, k: Span, kv_len, q_chunk: int):
  """Does a draw of any query block of the chunk land in the key chunk's block range?

  Checks the blocks that ``q_chunk`` contiguous positions can span; a chunk spanning more
  (positions that jump, e.g. several packed documents) is conservatively kept.
  """
  b = spec.block
  max_blocks = (q_chunk - 1) // b + 2
  q_lo, q_hi, k_lo, k_hi = q.pos_lo // b, q.pos_hi // b, k.pos_lo // b, k.pos_hi // b
  hit = q_hi - q_lo >= max_blocks
  for u in range(max_blocks):
    q_blk = q_lo + u
    draws = _random_hit_range(spec, q_blk, k_lo, k_hi, kv_len)
    hit |= (q_blk <= q_hi) & draws
  return hit


def _random_hit_range(spec: MaskSpec, q_blk, k_lo, k_hi, kv_len):
  choices = _random_choices(spec, q_blk, kv_len)
  hit = jnp.zeros(q_blk.shape, bool)
  for m in range(spec.random_blocks):
    r = random_block(spec.seed, q_blk, m, choices)
    hit |= (r >= k_lo) & (r <= k_hi)
  return hit


def _bigbird(spec: MaskSpec, q_pos, k_pos, kv_len):
  q_blk, k_blk = q_pos // spec.block, k_pos // spec.block
  return (_block_near(spec, q_blk, k_blk) | _is_global(spec, q_pos, k_pos)
          | _random_hit(spec, q_blk, k_blk, kv_len))


def _bigbird_maybe(spec: MaskSpec, q: Span, k: Span, kv_len, q_chunk):
  return (_block_near_maybe(spec, q, k) | _global_maybe(spec, q, k)
          | _random_maybe(spec, q, k, kv_len, q_chunk))


def _group(spec: MaskSpec, pos):
  return (pos - spec.shift) // spec.block


def _group_maybe(spec: MaskSpec, q: Span, k: Span):
  """Do the group ranges of the two chunks overlap?"""
  return (_group(spec, q.pos_lo) <= _group(spec, k.pos_hi)) & (
      _group(spec, k.pos_lo) <= _group(spec, q.pos_hi))


def _head_dependent(spec, *args):
  raise ValueError(f'attention pattern {spec.kind!r} depends on the head: attend() runs it as '
                   "'grouped' per half of the heads")


def _true(spec, q, k, kv_len):
  del spec, kv_len
  return jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)


def _true_span(spec, q: Span, k: Span, kv_len, q_chunk):
  del spec, k, kv_len, q_chunk
  return jnp.ones(q.pos_lo.shape, bool)


PATTERNS: dict[str, Pattern] = {p.name: p for p in (
    Pattern('dense', 'every key (causal: every earlier key), Vaswani et al. 2017', (),
            _true, _true_span),
    Pattern('sliding', 'sliding window, Beltagy et al. 2020 (Longformer) §3.1; Child et al. 2019',
            ('window',),
            lambda s, q, k, _: _within_window(s, q - k),
            lambda s, q, k, *_: _window_maybe(s, q, k)),
    Pattern('longformer', 'window + global tokens, Beltagy et al. 2020 (Longformer) §3.1',
            ('window',),
            lambda s, q, k, _: _within_window(s, q - k) | _is_global(s, q, k),
            lambda s, q, k, *_: _window_maybe(s, q, k) | _global_maybe(s, q, k)),
    Pattern('bigbird', 'block-sparse window + global + random, Zaheer et al. 2020 (BigBird) §2',
            ('block',), _bigbird, _bigbird_maybe),
    Pattern('sinks', 'attention sinks + window, Xiao et al. 2023 (StreamingLLM) §3.2',
            ('window', 'sink_tokens'),
            lambda s, q, k, _: _within_window(s, q - k) | (k < s.sink_tokens),
            lambda s, q, k, *_: _window_maybe(s, q, k) | (k.pos_lo < s.sink_tokens)),
    Pattern('blockwise', 'blockwise causal, Sun et al. 2022 (xPos) §3.3', ('block',),
            lambda s, q, k, _: _block_near(s, q // s.block, k // s.block),
            lambda s, q, k, *_: _block_near_maybe(s, q, k)),
    Pattern('grouped', 'attention within groups of block positions, offset by shift', ('block',),
            lambda s, q, k, _: _group(s, q) == _group(s, k),
            lambda s, q, k, *_: _group_maybe(s, q, k)),
    Pattern('shifted_sparse', 'shifted sparse attention (S²-Attn), Chen et al. 2024 (LongLoRA) §3.2',
            ('block',), _head_dependent, _head_dependent, shifts_half_heads=True),
)}


def mask_from_config(cfg, *, causal: bool = True) -> MaskSpec:
  """The MaskSpec of a ModelConfig's ``attention`` variant ('causal' is the plain 'dense' kind)."""
  return MaskSpec('dense' if cfg.attention == 'causal' else cfg.attention, causal=causal,
                  window=cfg.window, global_tokens=cfg.global_tokens,
                  sink_tokens=cfg.sink_tokens, block=cfg.attention_block,
                  random_blocks=cfg.bigbird_random_blocks, seed=cfg.bigbird_seed)
