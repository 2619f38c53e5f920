"""Which module mixes tokens in a block: ``model.memory`` for attention with memory, else ``model.mixer``.

lcr.model's Block asks :func:`select` once; a new mixer is one entry here (and its name in
lcr.config.MIXERS or MEMORIES). Attention's own module lives in lcr.model and is passed in.
"""

from __future__ import annotations

import flax.linen as nn

from lcr.config import ModelConfig
from lcr.mixers.infini import InfiniAttention
from lcr.mixers.linear import LinearAttention
from lcr.mixers.retention import MultiScaleRetention
from lcr.mixers.ssm import SelectiveSSM
from lcr.mixers.xl import XLAttention

# name → (module, its parameter scope in the block). Memories keep attention's scope and
# projections; the other mixers get their own.
MIXERS: dict[str, tuple[type[nn.Module] | None, str]] = {
    'attention': (None, 'attention'),
    'linear': (LinearAttention, 'mixer'),
    'retention': (MultiScaleRetention, 'mixer'),
    'ssm': (SelectiveSSM, 'mixer'),
}
MEMORIES: dict[str, tuple[type[nn.Module], str]] = {
    'xl': (XLAttention, 'attention'),
    'infini': (InfiniAttention, 'attention'),
}


def select(cfg: ModelConfig, attention: type[nn.Module]) -> tuple[type[nn.Module], str]:
  """(module class, scope name) of a block's token mixer; ``attention`` is softmax attention."""
  module, scope = MEMORIES[cfg.memory] if cfg.memory != 'none' else MIXERS[cfg.mixer]
  return module or attention, scope
