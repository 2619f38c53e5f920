"""The encoder-decoder as lcr.decode's loops call it: a ``Stepper`` (see lcr.decode.engine).

``params`` of the protocol is a *carry*: (params, source [B, S], source lengths [B]) and, for
training-time decoding (scheduled sampling), an rng key. The prefill encodes the source once,
stores every decoder layer's projections of the memory (the cross-attention keys and values) and
its alignment state in the cache, and runs the decoder prompt; each step then feeds one token per
row. Everything a step needs is in the cache (batch first), so beam search reorders it freely.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lcr.config import DecodeConfig, ModelConfig
from lcr.decode import cache as cache_lib
from lcr.seq2seq.model import EncoderDecoder


def source_inputs(source_BxS: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positions, segment ids) of right-padded sources: one example per row."""
  positions = jnp.broadcast_to(jnp.arange(source_BxS.shape[1], dtype=jnp.int32), source_BxS.shape)
  return positions, (positions < lengths_B[:, None]).astype(jnp.int32)


class EncoderDecoderStepper:
  """prefill(carry, prompt [B, P], lengths [B]) and step(carry, state, tokens [B], positions [B]).

  ``mode`` is the cross-attention mode (lcr.seq2seq.attention.MODES: decoding is 'hard' for
  monotonic attention); with ``deterministic=False`` dropout and monotonic noise draw from the
  carry's rng, folded with the step's position.
  """

  def __init__(self, model_cfg: ModelConfig, tips: Any, decode: DecodeConfig, prompt_len: int, *,
               mode: str = 'hard', deterministic: bool = True):
    self.cfg = dataclasses.replace(model_cfg, remat=False)
    self.layout = cache_lib.layout_for(self.cfg, prompt_len + decode.max_new_tokens)
    self.model = EncoderDecoder(self.cfg, tips, cache=self.layout, deterministic=deterministic,
                                mode=mode)
    self.prefill_len = prompt_len
    self.deterministic = deterministic

  def _rngs(self, carry, position):
    if self.deterministic:
      return {}
    key = jax.random.fold_in(carry[3], position)
    return {'dropout': jax.random.fold_in(key, 0), 'noise': jax.random.fold_in(key, 1)}

  def prefill(self, carry, prompt_BxP, lengths_B):
    params, source, source_lengths = carry[:3]
    src_pos, src_seg = source_inputs(source, source_lengths)
    positions = jnp.broadcast_to(jnp.arange(prompt_BxP.shape[1], dtype=jnp.int32), prompt_BxP.shape)
    segments = (positions < lengths_B[:, None]).astype(jnp.int32)
    out, variables = self.model.apply(
        {'params': params}, source, src_pos, src_seg, prompt_BxP, positions, segments,
        method=EncoderDecoder.prefill, mutable=['cache'], rngs=self._rngs(carry, 0))
    last = (lengths_B - 1)[:, None, None]
    return jnp.take_along_axis(out.log_probs, last, axis=1)[:, 0], variables['cache']

  def step(self, carry, state, tokens_B, positions_B):
    ones = jnp.ones_like(tokens_B)[:, None]
    out, variables = self.model.apply(
        {'params': carry[0], 'cache': state}, tokens_B[:, None], positions_B[:, None], ones,
        method=EncoderDecoder.step, mutable=['cache'], rngs=self._rngs(carry, jnp.max(positions_B)))
    return out.log_probs[:, 0], variables['cache']
