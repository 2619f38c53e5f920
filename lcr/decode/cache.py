"""Which positions a layer's KV cache keeps, where each lives, and how keys are stored.

One :class:`CacheLayout` per attention pattern, so memory follows what a query can see:

  * ``full``  — every position: slot = position (causal, bigbird).
  * ``ring``  — the last ``capacity`` positions: slot = position mod capacity (``sliding``: the
                window; ``blockwise``: two blocks, since a query sees its block and the one before).
  * ``sinks`` — slots [0, n) keep positions [0, n), the rest is a ring over the latest positions
                (``sinks``: StreamingLLM's attention sinks, Xiao et al. 2023; ``longformer``: the
                global tokens).

Writing T new tokens is a gather, not a scatter: slot j receives the latest new position that maps
to it, so a prompt longer than a ring lands whole and in order (no colliding writes).

Keys are cached after rotation when the rotation of a position never changes (RoPE, and its
static scalings), and before rotation otherwise, to be rotated at every use:
  * dynamic NTK changes the base as the sequence grows (exact semantics: every key is re-rotated
    with the current base; ``rotated_dynamic_ntk`` caches rotated keys instead, as Hugging Face's
    generate does, which drifts: transformers issue 25104);
  * xPos scales by ζ^(n/scale_base) around a centre that moves with the length;
  * StreamingLLM renumbers positions inside the cache (§3.2: "positions within the cache"): once
    the ring is full, a query at position p sits at cache position n + W − 1, the ring's keys
    keep their distance to it and the sinks keep positions 0 … n − 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcr.config import ROTARY_ENCODINGS, ModelConfig

LAYOUTS = ('full', 'ring', 'sinks')


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """A layer's cache: ``capacity`` slots, the first ``sinks`` of them fixed (see module doc)."""
  kind: str                 # 'full' | 'ring' | 'sinks'
  capacity: int
  sinks: int = 0
  renumber: bool = False    # StreamingLLM positions within the cache
  rotated: bool = True      # keys cached after rotation (else rotated at every use)

  def __post_init__(self):
    if self.kind not in LAYOUTS:
      raise ValueError(f'unknown cache layout {self.kind!r}; known: {LAYOUTS}')
    if self.capacity <= self.sinks or self.sinks < 0:
      raise ValueError(f'a cache needs more slots ({self.capacity}) than sinks ({self.sinks})')

  @property
  def ring(self) -> int:
    """Slots of the ring after the sinks (all slots for 'full' and 'ring')."""
    return self.capacity - self.sinks


def layout_for(cfg: ModelConfig, max_positions: int, *, rotated_dynamic_ntk: bool = False) -> CacheLayout:
  """The cache a model needs to decode sequences of up to ``max_positions`` positions."""
  rotary = cfg.pos in ROTARY_ENCODINGS
  rotated = rotary and cfg.pos != 'xpos' and (cfg.rope_scaling != 'dynamic_ntk' or rotated_dynamic_ntk)
  kind, capacity, sinks = 'full', max_positions, 0
  if cfg.attention == 'sliding':
    kind, capacity = 'ring', cfg.window
  elif cfg.attention == 'blockwise':
    kind, capacity = 'ring', 2 * cfg.attention_block
  elif cfg.attention == 'sinks':
    kind, capacity, sinks = 'sinks', cfg.sink_tokens + cfg.window, cfg.sink_tokens
  elif cfg.attention == 'longformer' and cfg.global_tokens:
    kind, capacity, sinks = 'sinks', cfg.global_tokens + cfg.window, cfg.global_tokens
  elif cfg.attention == 'longformer':
    kind, capacity = 'ring', cfg.window
  if capacity >= max_positions:   # nothing is ever evicted: keep every position
    return CacheLayout('full', max_positions, rotated=rotated or not rotary)
  renumber = cfg.attention == 'sinks'
  return CacheLayout(kind, capacity, sinks, renumber=renumber,
                     rotated=(rotated and not renumber) or not rotary)


def slot_targets(layout: CacheLayout, last_B: jax.Array) -> jax.Array:
  """[B, capacity] the latest position ≤ last that each slot holds (may be < 0: none yet)."""
  j = jnp.arange(layout.capacity)[None, :]
  last = last_B[:, None]
  n, w = layout.sinks, layout.ring
  ring = n + (last - n) - jnp.mod(last - j, w)    # j − n ≡ position − n (mod w)
  return jnp.where(j < n, jnp.where(j <= last, j, -1), jnp.where(ring >= n, ring, -1))


def slot_of(layout: CacheLayout, position: jax.Array) -> jax.Array:
  """The slot a position is written to."""
  n = layout.sinks
  return jnp.where(position < n, position, n + jnp.mod(position - n, layout.ring))


def write(layout: CacheLayout, cached: jax.Array, new: jax.Array, first_B: jax.Array,
          last_B: jax.Array, axis: int = 1) -> jax.Array:
  """The cache after writing new tokens at positions first … last of each row.

  ``axis`` is the slot axis of ``cached`` and the token axis of ``new`` (batch first in both):
  new[:, …, i] holds position first + i. Rows with last < first (no new token) keep their cache.
  One token per row is a scatter into its slot; more are a gather over every slot.
  """
  b = cached.shape[0]
  if new.shape[axis] == 1:   # every row writes its one token (a decoding step): in place
    index = (jnp.arange(b),) + (slice(None),) * (axis - 1) + (slot_of(layout, first_B),)
    return cached.at[index].set(jnp.squeeze(new, axis).astype(cached.dtype),
                                indices_are_sorted=True, unique_indices=True,
                                mode='promise_in_bounds')
  target = slot_targets(layout, last_B)                          # [B, C]
  take = (target >= first_B[:, None]) & (target <= last_B[:, None])
  shape = [b] + [1] * (new.ndim - 1)
  shape[axis] = layout.capacity
  index = jnp.clip(target - first_B[:, None], 0, new.shape[axis] - 1).reshape(shape)
  gathered = jnp.take_along_axis(new, jnp.broadcast_to(index, new.shape[:axis] + (
      layout.capacity,) + new.shape[axis + 1:]), axis=axis)
  return jnp.where(take.reshape(shape), gathered.astype(cached.dtype), cached)


def renumber(layout: CacheLayout, positions: jax.Array, query_last_B: jax.Array) -> jax.Array:
  """StreamingLLM positions within the cache for a query that reached position ``query_last``.

  The query moves to at most capacity − 1; keys past the sinks move by the same offset (their
  distance to the query is kept); the sinks keep their positions. Identity for other layouts.
  """
  if not layout.renumber:
    return positions
  offset = jnp.maximum(query_last_B - (layout.capacity - 1), 0)
  offset = offset.reshape(offset.shape + (1,) * (positions.ndim - 1))
  return jnp.where(positions < layout.sinks, positions, positions - offset)


def batch_axis(names: tuple[str | None, ...]) -> int:
  """Where the batch axis of a cache array is, from its logical axis names."""
  return names.index('batch')
