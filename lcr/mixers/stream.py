"""Evaluation of a recurrent model over a token stream of any length, in constant memory.

The stream is fed in chunks of ``chunk`` tokens, each call starting from the state the last one
ended in (the ``cache`` collection, lcr.mixers.carry): a mixer's recurrent state, Transformer-XL's
memory, Infini-attention's M and z. Memory holds one chunk's activations and the state, whatever
the stream's length, and the scores are those of one forward over the whole stream (the
decoding tests check that calls in a row equal one call). Positions run along the stream from 0,
as one document. Softmax attention without memory has no bounded state and is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcr.config import ModelConfig
from lcr.mixers import carry, checks


@dataclasses.dataclass(frozen=True)
class StreamScores:
  nll: float          # summed negative log-likelihood (nats) of every target
  tokens: int         # targets scored: len(stream) − 1

  @property
  def loss(self) -> float:
    return self.nll / self.tokens


def chunk_fn(model_cfg: ModelConfig):
  """jit(params, state, inputs [1, c], targets, positions, segment_ids, weights) → (nll, state)."""
  model = carry.stateful(model_cfg)

  def fn(params, memory, inputs, targets, positions, segments, weights):
    logits, updated = model.apply({'params': params, 'cache': memory}, inputs, positions, segments,
                                  mutable=['cache'])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights), updated['cache']
  return jax.jit(fn, donate_argnums=1)


def score(params: Any, model_cfg: ModelConfig, tokens: np.ndarray, chunk: int,
          jitted=None) -> StreamScores:
  """Scores every target of ``tokens`` [N], feeding ``chunk`` tokens per call."""
  if not checks.has_state(model_cfg):
    raise ValueError('streaming evaluation needs a model with a bounded state (model.mixer other '
                     "than 'attention', or model.memory); softmax attention's KV cache grows")
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  jitted = jitted or chunk_fn(model_cfg)
  memory = carry.empty(carry.abstract_memory(carry.stateful(model_cfg), 1, chunk))
  total, targets = 0.0, len(tokens) - 1
  for start in range(0, targets, chunk):
    n = min(chunk, targets - start)
    pad = lambda a, value=0: np.pad(a, (0, chunk - n), constant_values=value)[None]
    nll, memory = jitted(params, memory, pad(tokens[start:start + n]),
                         pad(tokens[start + 1:start + n + 1]),
                         pad(np.arange(start, start + n, dtype=np.int32)),
                         pad(np.ones(n, np.int32)), pad(np.ones(n, np.float32)))
    total += float(nll)
  return StreamScores(total, targets)
