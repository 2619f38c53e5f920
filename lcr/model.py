"""The decoder-only Transformer language model in Flax linen.

tokens → token embedding (+ absolute positions) → N blocks (attention and FFN, each with a
residual; pre- or post-norm) → final norm → output projection (tied or untied) → float32 logits.
Parameters and main activations carry logical axis names ('batch', 'length', 'embed', 'heads',
'kv_heads', 'kv', 'mlp', 'vocab', 'layers'); the mesh and the rules that map them live in config.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr import attention, layers, positional
from lcr.attention import configured
from lcr.config import ModelConfig
from lcr.decode import cache as cache_lib
from lcr.decode import layer_cache
from lcr.decode.cache import CacheLayout
from lcr.mixers import registry as mixers

EMBED_AXES = ('batch', 'length', 'embed')


class Attention(nn.Module):
  """Self-attention with the configured positional encoding, GQA, pattern and backend.

  With a ``cache`` layout it attends over its KV cache and the new tokens and updates the cache
  (lcr.decode.layer_cache); ``segments`` then mark real tokens (> 0) and padding (0).
  """
  cfg: ModelConfig
  cache: CacheLayout | None = None

  def _project(self, x, heads: int, axes: tuple[str, ...], name: str) -> jax.Array:
    cfg = self.cfg
    y = layers.projection(cfg, (heads, cfg.head_dim), axes, name)(x)
    return nn.with_logical_constraint(y, ('batch', 'length', axes[1], 'kv'))

  def _qkv(self, x_BxTxD, context_BxSxD):
    cfg = self.cfg
    q = self._project(x_BxTxD, cfg.num_heads, ('embed', 'heads', 'kv'), 'query')
    k = self._project(context_BxSxD, cfg.kv_heads, ('embed', 'kv_heads', 'kv'), 'key')
    v = self._project(context_BxSxD, cfg.kv_heads, ('embed', 'kv_heads', 'kv'), 'value')
    return q, k, v

  def _output(self, out_BxTxHxD) -> jax.Array:
    cfg = self.cfg
    out = nn.with_logical_constraint(out_BxTxHxD, ('batch', 'length', 'heads', 'kv'))
    return layers.projection(cfg, (cfg.d_model,), ('heads', 'kv', 'embed'), 'out', contract=2)(out)

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table, *,
               fresh_cache: bool = False) -> jax.Array:
    cfg = self.cfg
    q, k, v = self._qkv(x_BxTxD, x_BxTxD)
    if self.cache is not None:
      out = layer_cache.CachedAttention(cfg, self.cache, name='cache')(
          q, k, v, positions_BxT, segments_BxT, pos_table, fresh=fresh_cache)
    else:
      out = configured.attend(cfg, q, k, v, positions_BxT, positions_BxT, segments_BxT, segments_BxT,
                   positional.bias_fn(cfg, pos_table))
    return self._output(out)


class CrossAttention(Attention):
  """Encoder-decoder attention: queries from x [B,T,D], keys/values from context [B,S,D'].

  Every query sees every context token of its segment (no causal mask, no positional
  encoding, as in T5's cross-attention); segment ids, when both are given, pair each decoder
  document with its encoder document in packed rows. Runs through the same ``attend`` and
  backend as self-attention.
  """

  @nn.compact
  def __call__(self, x_BxTxD, context_BxSxD, x_segments_BxT=None,
               context_segments_BxS=None) -> jax.Array:
    cfg = self.cfg
    q, k, v = self._qkv(x_BxTxD, context_BxSxD)
    (b, t), s = x_BxTxD.shape[:2], context_BxSxD.shape[1]
    out = attention.attend(
        q, k, v, q_pos=jnp.broadcast_to(jnp.arange(t), (b, t)),
        k_pos=jnp.broadcast_to(jnp.arange(s), (b, s)), q_segments=x_segments_BxT,
        k_segments=context_segments_BxS, mask=attention.MaskSpec('dense', causal=False),
        chunk=cfg.attention_chunk, backend=cfg.attention_backend)
    return self._output(out)


class Block(nn.Module):
  """One Transformer layer: attention and FFN, each wrapped by layers.RESIDUALS[norm_placement]:
  pre-norm x + f(norm(x)), post-norm norm(x + f(x)) (Xiong et al. 2020) or DeepNorm.

  ``cache``/``fresh_cache``: decode with a KV cache of that layout (see :class:`Attention`).
  """
  cfg: ModelConfig
  deterministic: bool = True
  ffn_kind: str = ''    # this layer's FFN (cfg.ffn_kind(layer)); '' = cfg.ffn
  cache: CacheLayout | None = None
  fresh_cache: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    ffn = self.ffn_kind or cfg.ffn
    mixer, scope = mixers.select(cfg, Attention)   # attention, or lcr.mixers (model.mixer/memory)
    attend = mixer(cfg, self.cache, name=scope)
    sublayers = (
        ('attn', lambda h: attend(h, positions_BxT, segments_BxT, pos_table,
                                  fresh_cache=self.fresh_cache)),
        ('ffn', lambda h: layers.FFNS[ffn](cfg, ffn, self.deterministic, name='ffn')(h)),
    )
    x = x_BxTxD
    for name, sublayer in sublayers:
      x = layers.RESIDUALS[cfg.norm_placement](
          cfg, x, lambda h, f=sublayer: drop(f(h)), layers.norm(cfg, f'{name}_norm'))
      x = nn.with_logical_constraint(x, EMBED_AXES)
    return x, None


class BlockGroup(nn.Module):
  """``len(ffns)`` consecutive layers, one per FFN kind: what nn.scan repeats when the layers of an
  MoE model differ (moe.every > 1)."""
  cfg: ModelConfig
  deterministic: bool = True
  ffns: tuple[str, ...] = ()
  cache: CacheLayout | None = None
  fresh_cache: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table):
    remat = self.cfg.remat and self.cache is None
    block = nn.remat(Block, prevent_cse=False) if remat else Block
    for j, ffn in enumerate(self.ffns):
      x_BxTxD, _ = block(self.cfg, self.deterministic, ffn, self.cache, self.fresh_cache,
                         name=f'block_{j}')(
          x_BxTxD, positions_BxT, segments_BxT, pos_table)
    return x_BxTxD, None


class TransformerLM(nn.Module):
  """Decoder-only LM: (tokens, positions, segment_ids) [B, T] → logits [B, T, V] in float32.

  With a ``cache`` layout (lcr.decode) every attention layer keeps a KV cache in the ``cache``
  collection (apply with ``mutable=['cache']``): the tokens given are appended to what the cache
  holds, ``segment_ids`` mark real tokens (> 0) and padding (0), ``fresh_cache`` starts from an
  empty cache (a prefill), and ``logits_index`` [B] returns only the logits at that index of each
  row ([B, 1, V]). Under StreamingLLM's renumbering, absolute encodings embed each new token at
  its position within the cache.
  """
  cfg: ModelConfig
  cache: CacheLayout | None = None

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, *, deterministic: bool = True,
               fresh_cache: bool = False, logits_index: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(tokens_BxT)
    if positional.kind(cfg) == 'absolute' and self.cache is None:
      cfg.check_length(tokens_BxT.shape[1], 'input length')
    concat = positional.kind(cfg) == 'absolute' and cfg.pos_combine == 'concat'
    token_dim = cfg.d_model - cfg.concat_pos_dim if concat else cfg.d_model

    # Unit-scale token vectors: N(0, 1/d) init times √d (Vaswani et al. 2017 §3.4), so added
    # sinusoids (amplitude 1) neither swamp the tokens nor vanish beside them.
    embed = nn.Embed(cfg.vocab_size, token_dim, dtype=jnp.dtype(cfg.dtype),
                     param_dtype=jnp.dtype(cfg.param_dtype), name='token_embedding',
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=token_dim ** -0.5), ('vocab', 'embed')))
    # The lookup reads the whole table (all-gathered from its vocab and embed shards), so each
    # device gathers the rows of its own part of the batch.
    table = nn.with_logical_constraint(embed.embedding, (None, None))
    x = jnp.take(table, tokens_BxT, axis=0).astype(jnp.dtype(cfg.dtype))
    x = x * jnp.asarray(token_dim ** 0.5, jnp.dtype(cfg.dtype))
    if positional.kind(cfg) == 'absolute':
      pos_dim = cfg.concat_pos_dim if concat else cfg.d_model
      pos = positional.AbsoluteEmbedding(cfg, pos_dim, name='absolute_position')(
          self._embedded_positions(positions_BxT, segment_ids_BxT))
      pos = pos.astype(x.dtype)
      x = jnp.concatenate([x, pos], axis=-1) if concat else x + pos
    x = nn.with_logical_constraint(x, EMBED_AXES)
    x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
    pos_table = positional.T5Table(cfg, name='t5_bias')() if cfg.pos == 't5' else None

    x = self._layers(x, positions_BxT, segment_ids_BxT, pos_table, deterministic, fresh_cache)
    if logits_index is not None:   # [B] → the hidden state at that index of each row, [B, 1, D]
      x = jnp.take_along_axis(x, jnp.asarray(logits_index)[:, None, None], axis=1)
    if cfg.norm_placement == 'pre':
      x = layers.norm(cfg, 'final_norm')(x)

    if cfg.tie_embeddings:
      logits = embed.attend(x[..., :token_dim].astype(jnp.dtype(cfg.dtype)))
    else:
      logits = layers.dense(cfg, cfg.vocab_size, ('embed', 'vocab'), 'output')(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))

  def _layers(self, x, positions_BxT, segment_ids_BxT, pos_table, deterministic: bool,
              fresh_cache: bool):
    cfg = self.cfg
    ffns = tuple(cfg.ffn_kind(i) for i in range(cfg.num_layers))
    block = Block
    if cfg.remat and self.cache is None:
      block = nn.remat(block, prevent_cse=not cfg.scan_layers)
    decode = (self.cache, fresh_cache)
    if cfg.scan_layers:
      # One scanned unit per period of the FFN pattern: a Block, or a BlockGroup of `moe.every`.
      period = cfg.moe.every if len(set(ffns)) > 1 else 1
      unit, args = (block, (ffns[0],)) if period == 1 else (BlockGroup, (ffns[:period],))
      # Sown auxiliary losses and metrics are stacked over the scanned layers (scan would drop
      # them otherwise).
      stacked = {'params': 0, 'cache': 0, layers.AUX_LOSSES: 0, layers.MODEL_METRICS: 0}
      x, _ = nn.scan(unit, variable_axes=stacked, split_rngs={'params': True, 'dropout': True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                     length=cfg.num_layers // period,
                     metadata_params={nn.PARTITION_NAME: 'layers'})(
                         cfg, deterministic, *args, *decode, name='layers')(
                             x, positions_BxT, segment_ids_BxT, pos_table)
      return x
    for i in range(cfg.num_layers):
      x, _ = block(cfg, deterministic, ffns[i], *decode, name=f'layer_{i}')(
          x, positions_BxT, segment_ids_BxT, pos_table)
    return x

  def _embedded_positions(self, positions_BxT: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
    """The positions absolute encodings embed: StreamingLLM's cache positions when it renumbers."""
    if self.cache is None or not self.cache.renumber:
      return positions_BxT
    last = jnp.max(jnp.where(segment_ids_BxT > 0, positions_BxT, -1), axis=1)
    return cache_lib.renumber(self.cache, positions_BxT, last)
