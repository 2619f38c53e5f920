"""LongLoRA's shifted sparse attention (S²-Attn, Chen et al. 2024 §3.2) as two calls of ``attend``.

The context is split into groups of G = ``block`` positions and attention stays within a group; in
the second half of the heads the groups are shifted by G/2, so information flows between
neighbouring groups. The paper implements the shift by rolling the second half of the heads' tokens
by −G/2 (``roll(-G/2, 1)``), attending within groups and rolling back. Here the groups are a
pattern on positions, 'grouped' with group id (position − shift) // G, run with shift 0 for the
first half of the heads and shift G/2 for the second, so every backend runs it (tiles outside a
group are skipped like any other masked tile).

Wrap-around: the paper's roll wraps the last G/2 tokens around into the first group, where under
its index-causal mask the first G/2 tokens see the last G/2, which lie in their future. Groups on
positions do not wrap: the shifted heads' first group is positions [0, G/2) and their last group
the positions from the last multiple of G plus G/2 onwards, both half groups, and no token ever
sees a later one. Positions restart in each packed document, so groups are counted per document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lcr.attention.masks import MaskSpec


def half_head_specs(spec: MaskSpec) -> tuple[MaskSpec, MaskSpec]:
  """The 'grouped' patterns of the first and of the second half of the heads."""
  return (dataclasses.replace(spec, kind='grouped', shift=0),
          dataclasses.replace(spec, kind='grouped', shift=spec.block // 2))


def attend_shifted(attend: Callable[..., jax.Array], q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array,
                   v_BxSxKxD: jax.Array, *, mask: MaskSpec, bias_fn=None, **kwargs) -> jax.Array:
  """``attend`` over each half of the heads with its 'grouped' pattern, concatenated over heads.

  With an odd number of key/value heads (e.g. MQA) a K/V head would serve both halves, so K/V are
  repeated to one per query head first.
  """
  h, kv = q_BxTxHxD.shape[2], k_BxSxKxD.shape[2]
  if h % 2:
    raise ValueError(f'shifted sparse attention shifts half of the heads; {h} heads do not halve')
  if kv % 2:
    k_BxSxKxD = jnp.repeat(k_BxSxKxD, h // kv, axis=2)
    v_BxSxKxD = jnp.repeat(v_BxSxKxD, h // kv, axis=2)
    kv = h
  outs = []
  for half, spec in enumerate(half_head_specs(mask)):
    heads = slice(half * h // 2, (half + 1) * h // 2)
    kv_heads = slice(half * kv // 2, (half + 1) * kv // 2)
    half_bias = None if bias_fn is None else (
        lambda q_pos, k_pos, heads=heads: bias_fn(q_pos, k_pos)[:, heads])
    outs.append(attend(q_BxTxHxD[:, :, heads], k_BxSxKxD[:, :, kv_heads], v_BxSxKxD[:, :, kv_heads],
                       mask=spec, bias_fn=half_bias, **kwargs))
  return jnp.concatenate(outs, axis=2)
