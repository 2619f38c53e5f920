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
from lcr.config import ModelConfig

EMBED_AXES = ('batch', 'length', 'embed')


class Attention(nn.Module):
  """Self-attention with the configured positional encoding, GQA, pattern and backend."""
  cfg: ModelConfig

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
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table) -> jax.Array:
    cfg = self.cfg
    q, k, v = self._qkv(x_BxTxD, x_BxTxD)
    bias_fn = positional.bias_fn(cfg, pos_table)
    mask = attention.mask_from_config(cfg)

    def attend(q_blk, k_blk, v_blk, q_pos, k_pos, q_seg, k_seg, seq_len=None):
      if positional.kind(cfg) == 'rotary':
        q_blk, k_blk = positional.rotate(cfg, q_blk, k_blk, q_pos, k_pos, seq_len=seq_len)
      return attention.attend(
          q_blk, k_blk, v_blk, q_pos=q_pos, k_pos=k_pos, q_segments=q_seg, k_segments=k_seg,
          bias_fn=bias_fn, mask=mask, chunk=cfg.attention_chunk,
          length_scale_base=cfg.length_scale_base if cfg.length_scaled_logits else 0,
          backend=cfg.attention_backend, context_parallel=cfg.context_parallel)

    t = x_BxTxD.shape[1]
    block = cfg.rope_original_length
    if cfg.rope_scaling == 'dynamic_ntk' and t > block:
      # Dynamic NTK as in generation: queries in [s, e) use the base computed from the length
      # reached at e, and see keys rotated with that same base (one base per window would be
      # static NTK with α = T/L).
      outs = []
      for s in range(0, t, block):
        e = min(s + block, t)
        outs.append(attend(q[:, s:e], k[:, :e], v[:, :e], positions_BxT[:, s:e],
                           positions_BxT[:, :e], segments_BxT[:, s:e], segments_BxT[:, :e],
                           seq_len=jnp.max(positions_BxT[:, s:e]) + 1))
      out = jnp.concatenate(outs, axis=1)
    else:
      out = attend(q, k, v, positions_BxT, positions_BxT, segments_BxT, segments_BxT)
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
  """One Transformer layer: pre-norm x + f(norm(x)) or post-norm norm(x + f(x)) (Xiong et al. 2020)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    sublayers = (
        ('attn', lambda h: Attention(cfg, name='attention')(h, positions_BxT, segments_BxT, pos_table)),
        ('ffn', lambda h: layers.FFNS[cfg.ffn](cfg, name='ffn')(h)),
    )
    x = x_BxTxD
    for name, sublayer in sublayers:
      if cfg.norm_placement == 'pre':
        x = x + drop(sublayer(layers.norm(cfg, f'{name}_norm')(x).astype(x.dtype)))
      else:
        x = layers.norm(cfg, f'{name}_norm')(x + drop(sublayer(x))).astype(x.dtype)
      x = nn.with_logical_constraint(x, EMBED_AXES)
    return x, None


class TransformerLM(nn.Module):
  """Decoder-only LM: (tokens, positions, segment_ids) [B, T] → logits [B, T, V] in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(tokens_BxT)
    if positional.kind(cfg) == 'absolute':
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
      pos = positional.AbsoluteEmbedding(cfg, pos_dim, name='absolute_position')(positions_BxT)
      pos = pos.astype(x.dtype)
      x = jnp.concatenate([x, pos], axis=-1) if concat else x + pos
    x = nn.with_logical_constraint(x, EMBED_AXES)
    x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
    pos_table = positional.T5Table(cfg, name='t5_bias')() if cfg.pos == 't5' else None

    block = Block
    if cfg.remat:
      block = nn.remat(block, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x, _ = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: 'layers'})(
                         cfg, deterministic, name='layers')(x, positions_BxT, segment_ids_BxT, pos_table)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, deterministic, name=f'layer_{i}')(x, positions_BxT, segment_ids_BxT, pos_table)
    if cfg.norm_placement == 'pre':
      x = layers.norm(cfg, 'final_norm')(x)

    if cfg.tie_embeddings:
      logits = embed.attend(x[..., :token_dim].astype(jnp.dtype(cfg.dtype)))
    else:
      logits = layers.dense(cfg, cfg.vocab_size, ('embed', 'vocab'), 'output')(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))
