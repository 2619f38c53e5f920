"""Context parallelism: attention over a sequence sharded on the mesh axes ``length`` maps to.

When the logical axis ``length`` is sharded (the default rules map it to the mesh axis
``sequence``), every layer except attention works token by token on its own shard. Attention
needs every key, and ``model.context_parallel`` picks how a device gets them, inside
``shard_map`` over the sequence axes (the other mesh axes stay automatic):

  * ``ring``: blocks of keys and values go round the ring with ``lax.ppermute`` while each device
    folds them into an online softmax (Liu et al. 2023, lcr.attention.ring); memory per device
    is its own share of the sequence plus one visiting block.
  * ``all_gather``: queries stay sharded and keys and values (with their positions and segment
    ids) are all-gathered, then any backend runs on the local queries (the backward pass
    reduce-scatters dK and dV). Simple, and fast while the gathered K/V fit.

Positions and segment ids travel with their tokens, so masks, biases and rotations, all computed
from positions, need no change. Causal attention gives the devices holding the end of the
sequence the most work; :func:`balance` reorders a row so device r holds chunks r and 2·cp − 1 − r
of 2·cp equal chunks (the load balancing of Megatron-LM's context parallelism and MaxText), so
every device sees the same number of visible (query, key) pairs. The trainer reorders whole
batches (tokens, targets, weights, positions, segment ids alike): the loss is a sum over tokens,
so nothing needs to be put back; :func:`unbalance` is the inverse for outputs that must be.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from lcr.attention.masks import MaskSpec
from lcr.attention.ring import Ring, ring_attention, tile_size
from lcr.config import Config, fail
from lcr.positional import Bias

LocalAttend = Callable[..., jax.Array]   # (q, k, v, q_pos, k_pos, q_seg, k_seg, bias_fn) → out


# ----------------------------------------------------------------------------------------------
# Load balancing for causal attention.


def balance_order(length: int, cp: int) -> np.ndarray:
  """Index permutation of a row of ``length`` tokens: device r's contiguous share holds chunks r
  and 2·cp − 1 − r of 2·cp equal chunks. ``x[..., balance_order(T, cp)]`` is the balanced row."""
  if length % (2 * cp):
    raise ValueError(f'a sequence of {length} tokens does not split into 2·{cp} equal chunks')
  chunk = length // (2 * cp)
  chunks = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]
  return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def restore_order(length: int, cp: int) -> np.ndarray:
  """The inverse of :func:`balance_order`: ``balanced[..., restore_order(T, cp)]`` is the row."""
  return np.argsort(balance_order(length, cp))


def balance(x: jax.Array, cp: int, axis: int = 1) -> jax.Array:
  """``x`` with its ``axis`` (the sequence) in load-balanced order for ``cp`` devices."""
  return x if cp == 1 else x.take(balance_order(x.shape[axis], cp), axis=axis)


def unbalance(x: jax.Array, cp: int, axis: int = 1) -> jax.Array:
  """The inverse of :func:`balance`: the sequence back in its original order."""
  return x if cp == 1 else x.take(restore_order(x.shape[axis], cp), axis=axis)


def balance_batch(batch: Mapping[str, jax.Array], cp: int) -> dict[str, jax.Array]:
  """Every [B, T, ...] entry of a batch (tokens, targets, weights, positions, segment ids)
  reordered alike, so each token keeps its position, document, target and weight."""
  return {k: balance(v, cp) for k, v in batch.items()}


def balanced(step_fn: Callable[[Any, Mapping[str, jax.Array]], Any], cp: int):
  """``step_fn(state, batch)`` that first puts the batch in load-balanced order (cp > 1)."""
  if cp == 1:
    return step_fn

  @functools.wraps(step_fn)
  def step(state, batch):
    return step_fn(state, balance_batch(batch, cp))
  return step


def trainer_size(config: Config, mesh_shape: Mapping[str, int]) -> int:
  """How many devices the training sequence is sharded over (1: not sharded), after checking
  that the config can run so; a ConfigError naming the field otherwise."""
  axes = config.mesh.axes_of('length')
  cp = mesh_size(mesh_shape, axes)
  if cp == 1:
    return 1
  if config.model.context_parallel == 'none':
    fail('model.context_parallel', 'none', f'mesh axes {axes} shard the sequence {cp} ways; '
         f'choose one of {", ".join(METHODS)} (or give those mesh axes size 1)')
  if config.train.seq_len % (2 * cp):
    fail('train.seq_len', config.train.seq_len, f'the sequence is sharded {cp} ways and split '
         f'into 2·{cp} equal chunks for causal load balancing; use a multiple of {2 * cp}')
  return cp


# ----------------------------------------------------------------------------------------------
# Which mesh axes shard the sequence, and the sharded attention.


def sequence_axes() -> tuple[str, ...]:
  """The mesh axes (of size > 1) that the logical axis ``length`` maps to, under the mesh and
  logical-axis rules in scope; () without a mesh or when the sequence is not sharded."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  spec = nn.logical_to_mesh_axes(('length',))[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def mesh_size(mesh_shape: Mapping[str, int], axes: Sequence[str]) -> int:
  return math.prod(mesh_shape[a] for a in axes)


def explicit_bias(bias_fn) -> Bias | None:
  """``bias_fn`` as a :class:`lcr.positional.Bias` whose traced arrays are its ``params``.

  A plain function is accepted when it closes over no traced array (shard_map could not take it).
  """
  if bias_fn is None or isinstance(bias_fn, Bias):
    return bias_fn
  probe = jnp.zeros((1, 1), jnp.int32)
  if jax.closure_convert(bias_fn, probe, probe)[1]:
    raise ValueError('a logit bias with learned arrays must be an lcr.positional.Bias with them '
                     'as params to run sharded over the sequence')
  return Bias(lambda q_pos, k_pos: bias_fn(q_pos, k_pos))


def _ring_body(axes, cp, mask, scale, chunk, kv_len, bias, local):
  del local

  def body(q, k, v, q_pos, k_pos, q_seg, k_seg, consts):
    t, s = q.shape[1], k.shape[1]
    # Tiles within half a share: with a balanced row each half is one contiguous chunk, so
    # tiles above the causal diagonal are skipped.
    q_tile = tile_size(t // 2 if t % 2 == 0 else t, chunk)
    k_tile = tile_size(s // 2 if s % 2 == 0 else s, chunk)
    ring = Ring(axes=axes, size=cp, mask=mask, scale=scale, kv_len=kv_len, q_tile=q_tile,
                k_tile=k_tile, bias_fn=None if bias is None else bias.fn)
    return ring_attention(ring, q, k, v, q_pos, k_pos, q_seg, k_seg, consts)
  return body


def _all_gather_body(axes, cp, mask, scale, chunk, kv_len, bias, local):
  del cp, mask, scale, chunk, kv_len

  def body(q, k, v, q_pos, k_pos, q_seg, k_seg, consts):
    gather = lambda x: lax.all_gather(x, axes, axis=1, tiled=True)
    bias_fn = None if bias is None else bias.with_params(consts)
    return local(q, gather(k), gather(v), q_pos, gather(k_pos), q_seg, gather(k_seg), bias_fn)
  return body


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  paper: str
  body: Callable[..., Callable[..., jax.Array]]
  # shard_map's per-device type checks: the ring marks what differs per device itself; the
  # backends all_gather calls do not (their loop carries start equal on every device).
  check_vma: bool


METHODS: dict[str, Method] = {m.name: m for m in (
    Method('ring', 'ring attention, Liu et al. 2023; K/V blocks passed with ppermute', _ring_body,
           check_vma=True),
    Method('all_gather', 'K/V all-gathered over the sequence axes, queries sharded',
           _all_gather_body, check_vma=False),
)}


def sharded_attend(method: str, axes: tuple[str, ...], q, k, v, *, q_pos, k_pos, q_segments,
                   k_segments, mask: MaskSpec, bias_fn, scale: float, chunk: int,
                   local: LocalAttend) -> jax.Array:
  """Attention of q [B,T,H,D] over k, v [B,S,K,D] whose length axes are sharded over ``axes``.

  ``local`` runs one device's attention for ``all_gather``; ``ring`` has its own tiles.
  Inputs are global arrays (inside jit, under the mesh); segment ids may be None.
  """
  if method not in METHODS:
    raise ValueError(f'unknown context parallelism {method!r}; known: {", ".join(METHODS)}')
  mesh = jax.sharding.get_abstract_mesh()
  cp = mesh_size(mesh.shape, axes)
  t, s = q.shape[1], k.shape[1]
  if t % cp or s % cp:
    raise ValueError(f'{t} queries and {s} keys do not split over {cp} devices (mesh axes {axes})')
  if q_segments is None or k_segments is None:
    q_segments, k_segments = jnp.zeros_like(q_pos), jnp.zeros_like(k_pos)
  bias = explicit_bias(bias_fn)
  consts = () if bias is None else bias.params
  body = METHODS[method].body(axes, cp, mask, scale, chunk, s, bias, local)
  seq = PartitionSpec(None, axes)
  in_specs = (seq,) * 7 + (tuple(PartitionSpec() for _ in consts),)
  # Without the type checks, shard_map's transpose sums the gradient of the replicated bias
  # parameters over the sequence axes itself.
  return jax.shard_map(body, in_specs=in_specs, out_specs=seq, axis_names=set(axes),
                       check_vma=METHODS[method].check_vma)(
                           q, k, v, q_pos, k_pos, q_segments, k_segments, consts)
