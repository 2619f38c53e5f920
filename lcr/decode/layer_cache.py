"""One attention layer's KV cache as Flax variables, and attention over it for new tokens.

The cache lives in the ``cache`` collection: ``key``/``value`` [B, C, K, D] in the model's dtype
(K = num_kv_heads, so GQA/MQA caches hold only the shared heads) and ``position`` [B, C] int32,
the position each slot holds (−1: empty). Every array carries logical axis names, so a mesh shards
the cache as it shards activations (batch over data, heads over tensor).

A call with T new tokens per row (real tokens first, then padding with segment id 0; the real ones
at consecutive positions) attends over the cached keys and the new ones together, masked by the
configured pattern on the true positions, then writes the new keys into their slots
(lcr.decode.cache). ``fresh=True`` (a prefill) ignores what the cache holds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr import positional
from lcr.attention import configured
from lcr.config import ModelConfig
from lcr.decode import cache as cache_lib

KV_AXES = ('batch', 'cache_length', 'kv_heads', 'kv')
POSITION_AXES = ('batch', 'cache_length')


class CachedAttention(nn.Module):
  """Attention of new q/k/v [B, T, ·, D] (unrotated) over the cache and themselves."""
  cfg: ModelConfig
  layout: cache_lib.CacheLayout

  def _variables(self, batch: int, dtype):
    c, cfg = self.layout.capacity, self.cfg
    shape = (batch, c, cfg.kv_heads, cfg.head_dim)
    zeros = nn.with_logical_partitioning(jnp.zeros, KV_AXES)
    empty = nn.with_logical_partitioning(lambda s, d: jnp.full(s, -1, d), POSITION_AXES)
    return (self.variable('cache', 'key', zeros, shape, dtype),
            self.variable('cache', 'value', zeros, shape, dtype),
            self.variable('cache', 'position', empty, (batch, c), jnp.int32))

  @nn.compact
  def __call__(self, q, k, v, positions_BxT, segments_BxT, pos_table, *, fresh: bool = False):
    cfg, layout = self.cfg, self.layout
    key, value, position = self._variables(q.shape[0], k.dtype)
    real = segments_BxT > 0
    first = jnp.min(jnp.where(real, positions_BxT, jnp.iinfo(jnp.int32).max), axis=1)
    last = jnp.max(jnp.where(real, positions_BxT, -1), axis=1)
    renumber = lambda p: cache_lib.renumber(layout, p, last)
    rotary = positional.kind(cfg) == 'rotary'
    # Rows decoded with Hugging Face's rotated-key cache under dynamic NTK use one base per call.
    seq_len = last + 1 if rotary and layout.rotated and cfg.rope_scaling == 'dynamic_ntk' else None
    if rotary and layout.rotated:   # a static rotation: keys are cached rotated
      q, k = positional.rotate(cfg, q, k, positions_BxT, positions_BxT, seq_len=seq_len)
    write = lambda: self._write(key, value, position, k, v, positions_BxT, first, last)
    if fresh:
      k_all, v_all, k_pos, k_real = k, v, positions_BxT, real
      write()
    elif q.shape[1] == 1:
      # One token per row: write it first, then attend over the cache alone. Whatever the write
      # evicts lies outside the pattern of this query (a ring holds at least its window).
      write()
      k_all, v_all, k_pos = key.value, value.value, position.value
      k_real = k_pos >= 0
    else:
      k_all = jnp.concatenate([key.value, k.astype(key.value.dtype)], axis=1)
      v_all = jnp.concatenate([value.value, v.astype(value.value.dtype)], axis=1)
      k_pos = jnp.concatenate([position.value, positions_BxT], axis=1)
      k_real = jnp.concatenate([position.value >= 0, real], axis=1)
      write()
    bias_fn = positional.bias_fn(cfg, pos_table)
    if bias_fn is not None and layout.renumber:
      plain_bias = bias_fn
      bias_fn = lambda qp, kp: plain_bias(renumber(qp), renumber(kp))
    # Real queries (segment 1) see real keys (segment 1); padding queries (2) see nothing.
    out = configured.attend(
        cfg, q, k_all.astype(q.dtype), v_all.astype(v.dtype), positions_BxT, k_pos,
        jnp.where(real, 1, 2), k_real.astype(jnp.int32), bias_fn,
        rotate=rotary and not layout.rotated, enc_q_pos=renumber(positions_BxT),
        enc_k_pos=renumber(k_pos), seq_len=seq_len)
    return out

  def _write(self, key, value, position, k, v, positions_BxT, first, last):
    layout = self.layout
    key.value = nn.with_logical_constraint(cache_lib.write(layout, key.value, k, first, last), KV_AXES)
    value.value = nn.with_logical_constraint(
        cache_lib.write(layout, value.value, v, first, last), KV_AXES)
    position.value = cache_lib.write(layout, position.value, positions_BxT, first, last)
