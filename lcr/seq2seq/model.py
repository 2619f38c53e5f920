"""The encoder-decoder Transformer (Vaswani et al. 2017) with the pointer-generator head.

source → token embedding (+ absolute positions) → N encoder blocks (bidirectional self-attention
and FFN: every ``model.pos`` works without the causal mask; T5's buckets and ALiBi become
two-sided) → final norm = the memory. target inputs → token embedding (shared with the encoder's
by ``model.share_embeddings``) → N decoder blocks (causal self-attention with lcr's KV cache,
cross-attention of ``seq2seq.cross_attention`` kind, FFN) → final norm → output projection (tied to
the target embedding by ``model.tie_embeddings``) → log-probabilities, mixed with the copy
distribution when ``seq2seq.pointer``. Segment ids keep the examples of a packed row apart in every
attention. Decoder inputs are token ids [B, T], or distributions over the vocabulary [B, T, V]
(scheduled sampling's mixtures), embedded as the expected embedding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr import layers, positional
from lcr import model as model_lib
from lcr.attention import configured
from lcr.config import ModelConfig
from lcr.decode.cache import CacheLayout
from lcr.seq2seq.attention import AlignedCrossAttention, Memory

EMBED_AXES = model_lib.EMBED_AXES
TINY = 1e-30


class DecoderOutput(NamedTuple):
  log_probs: jax.Array                  # [B, T, V] float32
  attention: tuple[jax.Array, ...]      # per decoder layer, cross-attention α [B, H, T, S]
  p_gen: jax.Array | None               # [B, T] (pointer-generator only)


def residual(cfg: ModelConfig, x, name: str, sublayer, drop) -> jax.Array:
  """x + f(norm(x)) (pre-norm) or norm(x + f(x)) (post-norm): lcr.layers.RESIDUALS, as lcr.model.Block."""
  x = layers.RESIDUALS[cfg.norm_placement](cfg, x, lambda h: drop(sublayer(h)),
                                           layers.norm(cfg, f'{name}_norm'))
  return nn.with_logical_constraint(x, EMBED_AXES)


class TokenEmbedding(nn.Module):
  """Unit-scale token vectors (N(0, 1/d) times √d, as lcr.model) and the tied output projection."""
  cfg: ModelConfig

  def setup(self):
    d = self.cfg.d_model
    self.table = self.param('embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=d ** -0.5), ('vocab', 'embed')),
        (self.cfg.vocab_size, d), jnp.dtype(self.cfg.param_dtype))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Ids [B, T] → [B, T, D]; distributions [B, T, V] → their expected embedding."""
    dtype = jnp.dtype(self.cfg.dtype)
    table = self.table.astype(dtype)
    if jnp.issubdtype(inputs.dtype, jnp.integer):
      x = jnp.take(table, inputs, axis=0)
    else:
      x = jnp.einsum('btv,vd->btd', inputs.astype(dtype), table)
    return x * jnp.asarray(self.cfg.d_model ** 0.5, dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum('btd,vd->btv', x, self.table.astype(x.dtype))


class EncoderAttention(model_lib.Attention):
  """Self-attention without the causal mask: the encoder's (bidirectional position biases)."""

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, pos_table, *, fresh_cache=False):
    cfg = self.cfg
    q, k, v = self._qkv(x_BxTxD, x_BxTxD)
    out = configured.attend(cfg, q, k, v, positions_BxT, positions_BxT, segments_BxT,
                            segments_BxT, positional.bias_fn(cfg, pos_table, causal=False),
                            causal=False)
    return self._output(out)


def _embed_positions(cfg: ModelConfig, x, positions, name='absolute_position'):
  if positional.kind(cfg) != 'absolute':
    return x
  return x + positional.AbsoluteEmbedding(cfg, cfg.d_model, name=name)(positions).astype(x.dtype)


class EncoderBlock(nn.Module):
  """Bidirectional self-attention and FFN, each with a residual (pre- or post-norm)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, segments, pos_table):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    x = residual(cfg, x, 'attn', lambda h: EncoderAttention(cfg, name='attention')(
        h, positions, segments, pos_table), drop)
    return residual(cfg, x, 'ffn', lambda h: layers.FFNS[cfg.ffn](cfg, name='ffn')(h), drop)


class Encoder(nn.Module):
  cfg: ModelConfig
  embed: nn.Module
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BxS, positions_BxS, segments_BxS) -> jax.Array:
    cfg = self.cfg
    x = _embed_positions(cfg, self.embed(tokens_BxS), positions_BxS)
    x = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(
        nn.with_logical_constraint(x, EMBED_AXES))
    pos_table = positional.T5Table(cfg, name='t5_bias')() if cfg.pos == 't5' else None
    for i in range(cfg.num_layers):
      x = EncoderBlock(cfg, self.deterministic, name=f'layer_{i}')(
          x, positions_BxS, segments_BxS, pos_table)
    if cfg.norm_placement == 'pre':
      x = layers.norm(cfg, 'final_norm')(x).astype(x.dtype)
    return x


class DecoderBlock(nn.Module):
  """Causal self-attention (lcr.model.Attention, with its KV cache), cross-attention, FFN."""
  cfg: ModelConfig
  tips: Any
  deterministic: bool = True
  cache: CacheLayout | None = None
  fresh_cache: bool = False
  mode: str = 'expected'

  @nn.compact
  def __call__(self, x, positions, segments, pos_table, memory: Memory | None):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    x = residual(cfg, x, 'attn', lambda h: model_lib.Attention(cfg, self.cache, name='attention')(
        h, positions, segments, pos_table, fresh_cache=self.fresh_cache), drop)
    cross = AlignedCrossAttention(cfg, self.cache, tips=self.tips, mode=self.mode,
                                  name='cross_attention')
    seen = {}

    def attend(h):
      seen['out'], seen['weights'] = cross(h, memory, positions, segments,
                                           fresh_cache=self.fresh_cache)
      return seen['out']
    x = residual(cfg, x, 'cross', attend, drop)
    x = residual(cfg, x, 'ffn', lambda h: layers.FFNS[cfg.ffn](cfg, name='ffn')(h), drop)
    return x, seen['weights'], seen['out']


def pointer_mixture(vocab_probs_BxTxV, attention_BxTxS, p_gen_BxT, source_BxS) -> jax.Array:
  """See et al. 2017 eq. 9: P(w) = p_gen P_vocab(w) + (1 − p_gen) Σ_{i: x_i = w} a_i.

  A monotonic alignment may attend nothing (Σ_i a_i < 1); the copy mass it leaves, (1 − p_gen)
  (1 − Σ a), goes to P_vocab, so P sums to 1 (for Σ a = 1 this is eq. 9 exactly).
  """
  vocab = vocab_probs_BxTxV.shape[-1]
  copy = jnp.einsum('bts,bsv->btv', attention_BxTxS, jax.nn.one_hot(source_BxS, vocab))
  left = 1.0 - jnp.sum(attention_BxTxS, axis=-1)
  p = p_gen_BxT[..., None]
  return p * vocab_probs_BxTxV + (1.0 - p) * (copy + left[..., None] * vocab_probs_BxTxV)


class PointerGenerator(nn.Module):
  """p_gen = σ(w_h·h*_t + w_s·s_t + w_x·x_t + b) (See et al. 2017 eq. 8)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, context_BxTxD, state_BxTxD, inputs_BxTxD) -> jax.Array:
    def weight(name):
      return self.param(name, nn.initializers.normal(self.cfg.d_model ** -0.5), (self.cfg.d_model,))
    b = self.param('b', nn.initializers.zeros, ())
    logit = sum(jnp.einsum('btd,d->bt', x.astype(jnp.float32), weight(name))
                for name, x in (('w_h', context_BxTxD), ('w_s', state_BxTxD), ('w_x', inputs_BxTxD)))
    return jax.nn.sigmoid(logit + b)


class Decoder(nn.Module):
  cfg: ModelConfig
  tips: Any
  embed: nn.Module
  deterministic: bool = True
  cache: CacheLayout | None = None
  mode: str = 'expected'

  @nn.compact
  def __call__(self, inputs, positions_BxT, segments_BxT, memory: Memory | None, *,
               fresh_cache: bool = False) -> DecoderOutput:
    cfg = self.cfg
    x_in = _embed_positions(cfg, self.embed(inputs), positions_BxT)
    x = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(
        nn.with_logical_constraint(x_in, EMBED_AXES))
    pos_table = positional.T5Table(cfg, name='t5_bias')() if cfg.pos == 't5' else None
    source = memory.tokens if memory is not None else None
    if self.cache is not None:   # the pointer copies source tokens at every cached step
      var = self.variable('cache', 'source_tokens', lambda: source)
      if source is not None:
        var.value = source
      source = var.value
    maps = []
    for i in range(cfg.num_layers):
      x, weights, context = DecoderBlock(cfg, self.tips, self.deterministic, self.cache,
                                         fresh_cache, self.mode, name=f'layer_{i}')(
                                             x, positions_BxT, segments_BxT, pos_table, memory)
      maps.append(weights)
    if cfg.norm_placement == 'pre':
      x = layers.norm(cfg, 'final_norm')(x)
    if cfg.tie_embeddings:
      logits = self.embed.attend(x.astype(jnp.dtype(cfg.dtype)))
    else:
      logits = layers.dense(cfg, cfg.vocab_size, ('embed', 'vocab'), 'output')(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))
    if not self.tips.pointer:
      return DecoderOutput(jax.nn.log_softmax(logits, axis=-1), tuple(maps), None)
    copy_attention = jnp.mean(maps[-1], axis=1)                                  # [B, T, S]
    p_gen = PointerGenerator(cfg, name='pointer')(context, x, x_in)
    probs = pointer_mixture(jax.nn.softmax(logits, axis=-1), copy_attention, p_gen, source)
    return DecoderOutput(jnp.log(jnp.maximum(probs, TINY)), tuple(maps), p_gen)


class EncoderDecoder(nn.Module):
  """``__call__`` (teacher-forced, whole sequences), ``prefill`` and ``step`` (cached decoding).

  With a ``cache`` layout, ``prefill`` encodes the source, stores every layer's cross-attention
  projections of the memory and runs the decoder prompt; ``step`` feeds one token per row.
  """
  cfg: ModelConfig
  tips: Any
  cache: CacheLayout | None = None
  deterministic: bool = True
  mode: str = 'expected'

  def setup(self):
    self.token_embedding = TokenEmbedding(self.cfg)
    target = self.token_embedding
    if not self.cfg.share_embeddings:
      self.target_embedding = TokenEmbedding(self.cfg)
      target = self.target_embedding
    self.encoder = Encoder(self.cfg, self.token_embedding, self.deterministic)
    self.decoder = Decoder(self.cfg, self.tips, target, self.deterministic, self.cache, self.mode)

  def encode(self, source_BxS, positions_BxS, segments_BxS) -> Memory:
    states = self.encoder(source_BxS, positions_BxS, segments_BxS)
    return Memory(states, segments_BxS, source_BxS)

  def __call__(self, source_BxS, source_positions, source_segments, inputs, positions_BxT,
               segments_BxT) -> DecoderOutput:
    memory = self.encode(source_BxS, source_positions, source_segments)
    return self.decoder(inputs, positions_BxT, segments_BxT, memory)

  def prefill(self, source_BxS, source_positions, source_segments, inputs, positions_BxT,
              segments_BxT) -> DecoderOutput:
    memory = self.encode(source_BxS, source_positions, source_segments)
    return self.decoder(inputs, positions_BxT, segments_BxT, memory, fresh_cache=True)

  def step(self, tokens_BxT, positions_BxT, segments_BxT) -> DecoderOutput:
    return self.decoder(tokens_BxT, positions_BxT, segments_BxT, None)
