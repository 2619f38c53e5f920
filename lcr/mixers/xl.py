"""Segment-level recurrence: Transformer-XL, Dai et al. 2019 (§3.2, §3.3).

A layer reads its input in segments of S tokens (``model.segment_length``) and keeps the last M
hidden states before each segment (``model.memory_length``) as memory, with a stop-gradient:

    h̃_τ = [SG(m_τ) ∘ h_τ],   q = h_τ W_q,   k, v = h̃_τ W_k, h̃_τ W_v          (§3.2)

Each query sees its segment up to itself and the memory (lcr.mixers.segment_mask). Positions are
relative: RoPE, ALiBi or T5 act on the positions of memory and segment, through which only
distances q − k matter (the paper's own relative encoding, §3.3, is of the same kind). The
memory here is the attention's input (the block's normed hidden state) with its positions and
documents, kept in the ``cache`` collection: C = M + S − 1 states, which covers a query anywhere
in its segment, so a call may hold any number of tokens — a training row, a long evaluation
window, a prompt, or one decoding step — and several calls in a row give what one call over all
their tokens gives.

Within a call the tokens are cut into chunks of S and run in a ``lax.map``: chunk j attends over the
C states before it (stop-gradient) and over itself (with gradient), so a call over a long window
costs time linear in its length. Keys and values of the memory are recomputed from the stored
states with the current weights, as in the paper, so W_k and W_v get gradient through the memory.
A chunk holds one segment when positions start at a multiple of S (evaluation windows, prompts,
contiguous training streams with S dividing train.seq_len); where a document of a packed row
starts mid-chunk, the part of the chunk before the document's next segment boundary keeps its
gradient for queries after it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr import attention, positional
from lcr.config import ModelConfig
from lcr.decode.cache import CacheLayout
from lcr.mixers import heads, segment_mask, state


def attend_segment(cfg: ModelConfig, q, k, v, q_pos, k_pos, q_doc, k_doc, pos_table, mask):
  """Attention of q [B,T,H,D] over k/v [B,S,K,D] under ``mask``, the configured encoding acting on
  positions relative to the first query (float32 rotations stay exact along any stream)."""
  if positional.kind(cfg) == 'rotary':
    base = q_pos[:, :1]
    q, k = positional.rotate(cfg, q, k, q_pos - base, k_pos - base)
  return attention.attend(q, k, v, q_pos=q_pos, k_pos=k_pos, q_segments=q_doc, k_segments=k_doc,
                          bias_fn=positional.bias_fn(cfg, pos_table), mask=mask,
                          chunk=cfg.attention_chunk, backend=cfg.attention_backend)


class XLAttention(nn.Module):
  """Attention over [memory; segment] (see module doc); parameters named as lcr.model.Attention's."""
  cfg: ModelConfig
  cache: CacheLayout | None = None

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table=None, *,
               fresh_cache: bool = False) -> jax.Array:
    cfg = self.cfg
    b, t, d = x_BxTxD.shape
    capacity = cfg.memory_length + cfg.segment_length - 1
    start, store = state.load(self, self.cache is not None, fresh_cache, {
        'hidden': state.Spec((b, capacity, d), x_BxTxD.dtype, ('batch', None, 'embed')),
        'positions': state.Spec((b, capacity), jnp.int32, ('batch', None)),
        'docs': state.Spec((b, capacity), jnp.int32, ('batch', None))})
    chunk = min(cfg.segment_length, t)
    tok, n = state.split_chunks(state.tokens(positions_BxT, segments_BxT), chunk)
    x = state.pad_to(x_BxTxD, n * chunk)
    query = heads.projector(cfg, cfg.num_heads, heads.QUERY_AXES, 'query')
    key = heads.projector(cfg, cfg.kv_heads, heads.KV_AXES, 'key')
    value = heads.projector(cfg, cfg.kv_heads, heads.KV_AXES, 'value')
    # [memory; call] in arrival order (real tokens of a row come first): chunk j's memory is the
    # `capacity` entries before it, taken with a stop-gradient.
    held = jax.lax.stop_gradient(jnp.concatenate([start['hidden'], x], axis=1))
    held_pos = jnp.concatenate([start['positions'], tok.pos], axis=1)
    held_doc = jnp.concatenate([start['docs'], tok.doc], axis=1)
    q, k_now, v_now = query(x), key(x), value(x)
    k_held, v_held = key(held), value(held)
    mask = segment_mask.spec(cfg.segment_length, cfg.memory_length)

    def one_chunk(j):
      window = lambda a: jax.lax.dynamic_slice_in_dim(a, j * chunk, capacity, axis=1)
      now = lambda a: jax.lax.dynamic_slice_in_dim(a, j * chunk, chunk, axis=1)
      both = lambda held_a, a: jnp.concatenate([window(held_a), now(a)], axis=1)
      return attend_segment(cfg, now(q), both(k_held, k_now), both(v_held, v_now), now(tok.pos),
                            both(held_pos, tok.pos), now(tok.doc), both(held_doc, tok.doc),
                            pos_table, mask)
    out = state.unchunked(jax.lax.map(one_chunk, jnp.arange(n)))[:, :t]
    # The memory after the call: the `capacity` entries ending at each row's last real token.
    end = jnp.sum(tok.real, axis=1)
    take = jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, capacity, axis=0))
    store({'hidden': take(held, end), 'positions': take(held_pos, end), 'docs': take(held_doc, end)})
    return heads.output(cfg, out)
