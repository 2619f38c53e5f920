"""One attention layer's KV cache as Flax variables, and attention over it for new tokens.

The cache lives in the ``cache`` collection: ``key``/``value`` [B, K, C, D] in the model's dtype,
heads first (K = num_kv_heads, so GQA/MQA caches hold only the shared heads; a decoding step reads
them without a transposed copy, lcr.attention.single_query). Which position a slot holds follows
from the layout, since a row's positions enter the cache in order (lcr.decode.cache.slot_targets).
Both arrays carry logical axis names, so a mesh shards the cache as it shards activations (batch
over data, heads over tensor).

A call with T new tokens per row (real tokens first, then padding with segment id 0; the real ones
at consecutive positions) attends over the cached keys and the new ones together, masked by the
configured pattern on the true positions, and writes the new keys into their slots
(lcr.decode.cache). ``fresh=True`` (a prefill) ignores what the cache holds. One token per row (a
decoding step) attends over the cache and its own key (lcr.attention.single_query) and is
written after, in place. Under StreamingLLM's renumbering
the positions the encoding sees move with the last query of the call, so a call of several tokens
must not pass the cache's capacity (lcr.decode.engine prefills at most that much).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr import attention, positional
from lcr.attention import configured, single_query
from lcr.config import ModelConfig
from lcr.decode import cache as cache_lib

KV_AXES = ('batch', 'kv_heads', 'cache_length', 'kv')


class CachedAttention(nn.Module):
  """Attention of new q/k/v [B, T, ·, D] (unrotated) over the cache and themselves."""
  cfg: ModelConfig
  layout: cache_lib.CacheLayout

  def _variables(self, batch: int, dtype):
    c, cfg = self.layout.capacity, self.cfg
    shape = (batch, cfg.kv_heads, c, cfg.head_dim)
    zeros = nn.with_logical_partitioning(jnp.zeros, KV_AXES)
    return (self.variable('cache', 'key', zeros, shape, dtype),
            self.variable('cache', 'value', zeros, shape, dtype))

  @nn.compact
  def __call__(self, q, k, v, positions_BxT, segments_BxT, pos_table, *, fresh: bool = False):
    cfg, layout = self.cfg, self.layout
    key, value = self._variables(q.shape[0], k.dtype)
    real = segments_BxT > 0
    first = jnp.min(jnp.where(real, positions_BxT, jnp.iinfo(jnp.int32).max), axis=1)
    last = jnp.max(jnp.where(real, positions_BxT, -1), axis=1)
    renumber = lambda p: cache_lib.renumber(layout, p, last)
    rotary = positional.kind(cfg) == 'rotary'
    # Hugging Face's rotated-key cache under dynamic NTK: one base per row and call.
    seq_len = last + 1 if rotary and layout.rotated and cfg.rope_scaling == 'dynamic_ntk' else None
    if rotary and layout.rotated:   # a static rotation: keys are cached rotated
      q, k = positional.rotate(cfg, q, k, positions_BxT, positions_BxT, seq_len=seq_len)
    bias_fn = positional.bias_fn(cfg, pos_table)
    if bias_fn is not None and layout.renumber:
      plain_bias = bias_fn
      bias_fn = lambda qp, kp: plain_bias(renumber(qp), renumber(kp))
    write = lambda: self._write(key, value, k, v, first, last)
    # Every position before a row's first new token is in the cache (prefill, then consecutive
    # steps), so which position each slot holds follows from the layout.
    cached_pos = cache_lib.slot_targets(layout, first - 1)
    if q.shape[1] == 1 and not fresh:
      out = self._step(q, k, v, key.value, value.value, positions_BxT[:, 0], cached_pos,
                       renumber, bias_fn)
      # The new key and value must be written after the step has read the cache. Left free, XLA
      # may order the write first and copy the whole cache each step to keep the old one for the
      # read; a data dependency on the output (+ 0·Σout, which XLA does not fold for floats)
      # keeps the write in place (benchmarks/decode.py: 9 → 1.2 ms per step at 32k).
      after = 0.0 * jnp.sum(out.astype(jnp.float32))
      k, v = (k.astype(jnp.float32) + after).astype(k.dtype), (v.astype(jnp.float32) + after).astype(v.dtype)
      write()
      return out[:, None]
    if fresh:
      k_all, v_all, k_pos, k_real = k, v, positions_BxT, real
    else:
      cached = lambda var: var.value.swapaxes(1, 2).astype(q.dtype)
      k_all = jnp.concatenate([cached(key), k.astype(q.dtype)], axis=1)
      v_all = jnp.concatenate([cached(value), v.astype(q.dtype)], axis=1)
      k_pos = jnp.concatenate([cached_pos, positions_BxT], axis=1)
      k_real = jnp.concatenate([cached_pos >= 0, real], axis=1)
    # Real queries (segment 1) see real keys (segment 1); padding queries (2) see nothing.
    out = configured.attend(
        cfg, q, k_all, v_all, positions_BxT, k_pos, jnp.where(real, 1, 2),
        k_real.astype(jnp.int32), bias_fn, rotate=rotary and not layout.rotated,
        enc_q_pos=renumber(positions_BxT), enc_k_pos=renumber(k_pos), seq_len=seq_len)
    write()
    return out

  def _step(self, q_Bx1xHxD, k_Bx1xKxD, v_Bx1xKxD, k_BxKxCxD, v_BxKxCxD, q_pos_B, k_pos_BxC,
            renumber, bias_fn):
    """One query per row over the cache and its own key, before that key is written."""
    cfg, layout = self.cfg, self.layout
    dtype = q_Bx1xHxD.dtype
    if positional.kind(cfg) == 'rotary' and not layout.rotated:
      # Keys cached before rotation: rotate them all at their (cache) positions with the base of
      # this query's length, which for dynamic NTK is exactly the per-query semantics.
      enc_q = renumber(q_pos_B[:, None])
      seq_len = enc_q[:, 0] + 1 if cfg.rope_scaling == 'dynamic_ntk' else None
      all_keys = jnp.concatenate([k_BxKxCxD.astype(dtype), k_Bx1xKxD.swapaxes(1, 2).astype(dtype)], 2)
      all_pos = renumber(jnp.concatenate([k_pos_BxC, q_pos_B[:, None]], axis=1))
      q_Bx1xHxD, all_keys = positional.rotate(cfg, q_Bx1xHxD, all_keys, enc_q, all_pos,
                                              seq_len=seq_len, k_heads_first=True)
      k_BxKxCxD, k_Bx1xKxD = all_keys[:, :, :-1], all_keys[:, :, -1:].swapaxes(1, 2)
    factor = None
    if cfg.length_scaled_logits:
      factor = attention.length_scale(q_pos_B[:, None], cfg.length_scale_base)[:, 0]
    # The slot this token is written to must not count: it holds an older position or nothing.
    valid = (k_pos_BxC >= 0) & (k_pos_BxC != q_pos_B[:, None])
    return single_query.attention(
        q_Bx1xHxD[:, 0], k_BxKxCxD.astype(dtype), v_BxKxCxD.astype(dtype), k_Bx1xKxD[:, 0].astype(dtype),
        v_Bx1xKxD[:, 0].astype(dtype), q_pos_B=q_pos_B, k_pos_BxC=k_pos_BxC, k_valid_BxC=valid,
        mask=attention.mask_from_config(cfg), bias_fn=bias_fn, logit_factor_B=factor)

  def _write(self, key, value, k, v, first, last):
    for var, new in ((key, k), (value, v)):
      var.value = nn.with_logical_constraint(
          cache_lib.write(self.layout, var.value, new.swapaxes(1, 2), first, last, axis=2), KV_AXES)
