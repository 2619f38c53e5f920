"""Compressive memory: Infini-attention, Munkhdalai et al. 2024, "Leave No Context Behind" (§2.1).

A layer reads its input in segments of S tokens (``model.segment_length``). Within a segment it is
ordinary causal attention (local attention, §2.1.1; lcr.mixers.segment_mask with no memory).
Everything before the segment is compressed into one memory per head, an associative matrix M
[d_k, d_v] and a normaliser z [d_k], read and written with σ(x) = elu(x) + 1 (§2.1.2):

    retrieval        A_mem = σ(Q) M_{s−1} / (σ(Q) z_{s−1})
    linear update    M_s = M_{s−1} + σ(K)ᵀ V,                             z_s = z_{s−1} + Σ_t σ(K_t)
    delta update     M_s = M_{s−1} + σ(K)ᵀ (V − σ(K) M_{s−1} / (σ(K) z_{s−1})),   z_s as above
    gate             A = sigmoid(β) ⊙ A_mem + (1 − sigmoid(β)) ⊙ A_dot,  one learned β per head

(``model.memory_update``: 'linear' or 'delta'). The memory reads and writes the queries and keys
before the positional encoding; the encoding acts in the local attention. An empty memory
(z = 0) reads 0. M and z are float32; GQA heads share their key/value head's memory.

State (``cache`` collection): M, z, the document and segment the memory belongs to, and the current
segment's keys and values (S slots; a slot is its position mod S). A segment is folded into M
when the first token after it arrives, so calls may hold any number of tokens — a training row, a
long window, a prompt, one decoding step — and several calls give what one call over all their
tokens gives. Within a call the tokens run in chunks of S through a ``lax.scan`` that carries the
state, so gradients flow through the memory across the segments of a call (as the paper trains);
from one call to the next (carried training state) they do not.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr.config import ModelConfig
from lcr.decode.cache import CacheLayout
from lcr.mixers import heads, segment_mask, state
from lcr.mixers.xl import attend_segment


def read(sigma_q, memory, normaliser, use):
  """σ(q)M / σ(q)z per query, 0 where the memory is empty or ``use`` is False.

  sigma_q [B, T, K, G, D] (queries grouped by key/value head), memory [B, K, D, E], normaliser
  [B, K, D], use [B, T]. Returns (numerator [B,T,K,G,E], denominator [B,T,K,G]) with ``use`` applied.
  """
  w = use.astype(jnp.float32)[:, :, None, None]
  num = jnp.einsum('btkgd,bkde->btkge', sigma_q, memory) * w[..., None]
  den = jnp.einsum('btkgd,bkd->btkg', sigma_q, normaliser) * w
  return num, den


def update_values(cfg: ModelConfig, sigma_k, v, st, from_state):
  """What each key writes: V (linear), or V − σ(K)M/(σ(K)z) (delta) against the memory the key's
  document starts from (the state's, where ``from_state`` [B, S], else empty)."""
  v = v.astype(jnp.float32)
  if cfg.memory_update == 'linear':
    return v
  num, den = read(sigma_k[:, :, :, None], st['memory'], st['normaliser'], from_state)
  retrieved = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
  return v - retrieved[:, :, :, 0]


def infini_chunk(cfg: ModelConfig, st, q, k, v, tok: state.Tokens, *, gate_H, pos_table):
  """One chunk of at most S tokens (see module doc). q [B,c,H,D], k/v [B,c,K,D] before encoding."""
  s_len = cfg.segment_length
  b, c, h, d = q.shape
  kv = k.shape[2]
  keys = jnp.concatenate([st['keys'].astype(k.dtype), k], axis=1)              # [B, S + c, K, D]
  values = jnp.concatenate([st['values'].astype(v.dtype), v], axis=1)
  k_pos = jnp.concatenate([st['positions'], tok.pos], axis=1)
  k_doc = jnp.concatenate([st['docs'], tok.doc], axis=1)
  local = attend_segment(cfg, q, keys, values, tok.pos, k_pos, tok.doc, k_doc, pos_table,
                         segment_mask.spec(s_len, 0))
  # Memory: the state's (for tokens of its document) plus, for a query in the segment after it,
  # that segment's keys (the fold it would get, computed as masked linear attention).
  sigma_q = heads.elu_plus_one(q).reshape(b, c, kv, h // kv, d)
  sigma_k = heads.elu_plus_one(keys)
  k_real = k_doc > 0
  seg, k_seg = tok.pos // s_len, k_pos // s_len
  writes = update_values(cfg, sigma_k, values, st, k_doc == st['doc'][:, None])
  folded = ((k_doc[:, None, :] == tok.doc[:, :, None]) & (k_seg[:, None, :] == seg[:, :, None] - 1)
            & k_real[:, None, :]).astype(jnp.float32)                              # [B, c, S + c]
  scores = jnp.einsum('btkgd,bskd,bts->btkgs', sigma_q, sigma_k, folded)
  num, den = read(sigma_q, st['memory'], st['normaliser'], tok.doc == st['doc'][:, None])
  num = num + jnp.einsum('btkgs,bske->btkge', scores, writes)
  den = den + jnp.sum(scores, axis=-1)
  memory_out = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
  gate = jax.nn.sigmoid(gate_H.astype(jnp.float32)).reshape(1, 1, kv, h // kv, 1)
  out = gate * memory_out + (1.0 - gate) * local.astype(jnp.float32).reshape(b, c, kv, h // kv, d)
  return out.reshape(b, c, h, d), _next_state(st, sigma_k, keys, values, writes, k_pos, k_doc,
                                              k_seg, tok, s_len)


def _next_state(st, sigma_k, keys, values, writes, k_pos, k_doc, k_seg, tok, s_len):
  """The state after the chunk: the last real token's document and segment, the memory of every
  segment of that document before it, and that segment's keys and values in their slots."""
  last_doc, last_seg = tok.last(tok.doc), tok.last(tok.pos // s_len)
  kept = (last_doc == st['doc']).astype(jnp.float32)
  k_real = k_doc > 0
  fold = (k_real & (k_doc == last_doc[:, None]) & (k_seg == last_seg[:, None] - 1)).astype(jnp.float32)
  memory = kept[:, None, None, None] * st['memory'] + jnp.einsum('bskd,bske,bs->bkde', sigma_k,
                                                                  writes, fold)
  normaliser = kept[:, None, None] * st['normaliser'] + jnp.einsum('bskd,bs->bkd', sigma_k, fold)
  current = k_real & (k_doc == last_doc[:, None]) & (k_seg == last_seg[:, None])
  slots = (k_pos % s_len)[:, :, None] == jnp.arange(s_len)[None, None]
  place = (slots & current[:, :, None]).astype(jnp.float32)                    # [B, S + c, S]
  filled = jnp.any(place > 0, axis=1)
  return {'memory': memory, 'normaliser': normaliser,
          'keys': jnp.einsum('bes,bekd->bskd', place, keys.astype(jnp.float32)),
          'values': jnp.einsum('bes,bekd->bskd', place, values.astype(jnp.float32)),
          'positions': jnp.sum(jnp.where(place > 0, k_pos[:, :, None], 0), axis=1),
          'docs': jnp.where(filled, last_doc[:, None], 0), 'doc': last_doc, 'segment': last_seg}


class InfiniAttention(nn.Module):
  """Local attention and a compressive memory, mixed by a learned gate (see module doc)."""
  cfg: ModelConfig
  cache: CacheLayout | None = None

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table=None, *,
               fresh_cache: bool = False) -> jax.Array:
    cfg = self.cfg
    b, kv, d, s_len = x_BxTxD.shape[0], cfg.kv_heads, cfg.head_dim, cfg.segment_length
    dtype = x_BxTxD.dtype
    start, store = state.load(self, self.cache is not None, fresh_cache, {
        'memory': state.Spec((b, kv, d, d), jnp.float32, ('batch', 'kv_heads', 'kv', None)),
        'normaliser': state.Spec((b, kv, d), jnp.float32, ('batch', 'kv_heads', 'kv')),
        'keys': state.Spec((b, s_len, kv, d), dtype, ('batch', None, 'kv_heads', 'kv')),
        'values': state.Spec((b, s_len, kv, d), dtype, ('batch', None, 'kv_heads', 'kv')),
        'positions': state.Spec((b, s_len), jnp.int32, ('batch', None)),
        'docs': state.Spec((b, s_len), jnp.int32, ('batch', None)),
        'doc': state.Spec((b,), jnp.int32, ('batch',)),
        'segment': state.Spec((b,), jnp.int32, ('batch',))})
    q, k, v = heads.qkv(cfg, x_BxTxD)
    gate = self.param('gate', nn.with_logical_partitioning(nn.initializers.zeros, ('heads',)),
                      (cfg.num_heads,), jnp.float32)
    step = lambda st, *a: infini_chunk(cfg, st, *a, gate_H=gate, pos_table=pos_table)
    out, final = state.over_chunks(step, start, (q, k, v), state.tokens(positions_BxT, segments_BxT),
                                   min(s_len, x_BxTxD.shape[1]))
    store(final)
    return heads.output(cfg, out.astype(dtype))
