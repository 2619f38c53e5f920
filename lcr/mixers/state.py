"""What every recurrent layer shares: which tokens are real, their documents, and the state variables.

A call gets tokens [B, T] with positions and segment ids. Segment id 0 is padding (right-padded
rows: real tokens first), any other value names a document. A layer's state belongs to one document
per row, the one its last real token was in (``doc``, 0 = empty): a token continues the state when
its document is the state's, and starts from an empty state otherwise. So packed documents stay
isolated, a prompt starts fresh, and padding never changes the state.

The state lives in the Flax ``cache`` collection, as lcr.decode's KV cache does (apply with
``mutable=['cache']``); each array carries logical axis names with 'batch' first, so a mesh shards
it and beam search reorders it along the batch. Without a cache layout a layer is stateless: it
starts from the empty state and keeps nothing (training, and evaluation of one window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

PAD_DOC = -1     # the document id padding tokens get: never a state's (>= 0) nor a real token's


class Tokens(NamedTuple):
  """Bookkeeping of one call: pos/doc/real [B, T]; doc is PAD_DOC at padding."""
  pos: jax.Array
  doc: jax.Array
  real: jax.Array

  @property
  def any_real(self) -> jax.Array:
    return jnp.any(self.real, axis=1)

  def last(self, values_BxTx: jax.Array) -> jax.Array:
    """values at each row's last real token ([B, ...]; index 0 when the row has none)."""
    index = jnp.maximum(jnp.sum(self.real, axis=1) - 1, 0)
    return jnp.take_along_axis(values_BxTx, index.reshape((-1, 1) + (1,) * (values_BxTx.ndim - 2)),
                               axis=1)[:, 0]


def tokens(positions_BxT: jax.Array, segments_BxT: jax.Array) -> Tokens:
  real = segments_BxT > 0
  return Tokens(positions_BxT.astype(jnp.int32), jnp.where(real, segments_BxT, PAD_DOC).astype(jnp.int32),
                real)


def pad_to(x: jax.Array, length: int, axis: int = 1, value: Any = 0) -> jax.Array:
  """x padded with ``value`` along ``axis`` to ``length``."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def split_chunks(tok: Tokens, chunk: int) -> tuple[Tokens, int]:
  """Tokens padded to a multiple of ``chunk`` (padding: not real), and the number of chunks."""
  t = tok.pos.shape[1]
  n = -(-t // chunk)
  padded = Tokens(pad_to(tok.pos, n * chunk), pad_to(tok.doc, n * chunk, value=PAD_DOC),
                  pad_to(tok.real, n * chunk, value=False))
  return padded, n


def chunked(x: jax.Array, n: int) -> jax.Array:
  """[B, n·c, ...] → [n, B, c, ...] (the leading axis for lax.scan)."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, n, t // n) + x.shape[2:]), 1, 0)


def unchunked(x: jax.Array) -> jax.Array:
  """[n, B, c, ...] → [B, n·c, ...]."""
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])


@dataclasses.dataclass(frozen=True)
class Spec:
  """One state array: shape (batch first), dtype, logical axis names."""
  shape: tuple[int, ...]
  dtype: Any
  axes: tuple[str | None, ...]


def load(module: nn.Module, stateful: bool, fresh: bool, specs: Mapping[str, Spec]
         ) -> tuple[dict[str, jax.Array], Callable[[dict[str, jax.Array]], None]]:
  """(the state a call starts from, ``store(new_state)``).

  Stateless or ``fresh``: the empty state (zeros; ``doc`` 0). Stateful: variables of the ``cache``
  collection, created as zeros, which ``store`` overwrites.
  """
  empty = {name: jnp.zeros(s.shape, s.dtype) for name, s in specs.items()}
  if not stateful:
    return empty, lambda new: None
  variables = {name: module.variable('cache', name, nn.with_logical_partitioning(jnp.zeros, s.axes),
                                     s.shape, s.dtype) for name, s in specs.items()}
  start = empty if fresh else {name: v.value for name, v in variables.items()}

  def store(new: dict[str, jax.Array]) -> None:
    for name, var in variables.items():
      var.value = jax.lax.stop_gradient(new[name]).astype(specs[name].dtype)
  return start, store


def keep_without_tokens(tok: Tokens, new: Mapping[str, jax.Array], old: Mapping[str, jax.Array]
                        ) -> dict[str, jax.Array]:
  """``new`` for rows with a real token in the call, ``old`` for the others (padding alone)."""
  any_real = tok.any_real

  def pick(n, o):   # in the old state's dtype, so a lax.scan carries it unchanged
    return jnp.where(any_real.reshape((-1,) + (1,) * (n.ndim - 1)), n.astype(o.dtype), o)
  return {name: pick(new[name], old[name]) for name in new}


def over_chunks(step: Callable[..., tuple[jax.Array, dict[str, jax.Array]]], start: dict[str, jax.Array],
                arrays: tuple[jax.Array, ...], tok: Tokens, chunk: int
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``step(state, *arrays, tok) → (out [B, c, ...], state)`` over consecutive chunks of ``chunk``
  tokens (0, or ≥ T: the whole call at once), carrying the state; rows whose chunk is all padding
  keep theirs. Returns (out [B, T, ...], the state after the call)."""
  t = tok.pos.shape[1]

  def guarded(st, arrays_, tok_):
    out, new = step(st, *arrays_, tok_)
    return out, keep_without_tokens(tok_, new, st)

  if chunk <= 0 or chunk >= t:
    return guarded(start, arrays, tok)
  padded, n = split_chunks(tok, chunk)
  xs = (tuple(chunked(pad_to(a, n * chunk), n) for a in arrays),
        Tokens(*(chunked(x, n) for x in padded)))

  def body(st, x):
    out, new = guarded(st, *x)
    return new, out
  final, outs = jax.lax.scan(body, start, xs)
  return unchunked(outs)[:, :t], final
