"""A recurrent model's state carried from one training step to the next (``data.contiguous``).

Row b of every batch continues row b of the batch before (lcr.data.contiguous), so the state each
layer ends a step with — Transformer-XL's memory, Infini-attention's M and z, a mixer's recurrent
state — is where the next step starts (Dai et al. 2019 §3.2: the previous segment's hidden states,
"fixed and cached", with no gradient). The trainer keeps it in ``TrainState.memory`` (so a
checkpoint holds it and a resumed run continues exactly) and applies the model with it as the
``cache`` collection.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr.config import ModelConfig
from lcr.decode.cache import CacheLayout
from lcr.model import TransformerLM

# Recurrent layers keep their state in the cache collection and ignore the layout's capacity.
STATE_ONLY = CacheLayout('full', 1)


def stateful(model_cfg: ModelConfig) -> TransformerLM:
  """The model that reads and writes its layers' state (apply with mutable=['cache'])."""
  return TransformerLM(model_cfg, cache=STATE_ONLY)


def abstract_memory(model: TransformerLM, batch_size: int, seq_len: int) -> Any:
  """The ``cache`` collection for a global batch: shapes, dtypes and logical axes (boxed)."""
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  return jax.eval_shape(lambda rng: model.init(rng, tokens, jnp.zeros_like(tokens),
                                               jnp.ones_like(tokens)), jax.random.key(0))['cache']


def empty(abstract: Any) -> Any:
  """The state before the first step: zeros (document 0: no document yet)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(abstract))
