"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lcr.config import TrainConfig

# Parameters named like this are norm gains and biases: no weight decay on them (GPT-2/nanoGPT,
# Loshchilov & Hutter 2019). Matched by name, so layer-stacked ([layers, D]) copies match too.
NO_DECAY_NAMES = ('bias', 'scale')


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
  """0 → lr linearly over warmup_steps, then cosine to lr * min_lr_ratio at the last step."""
  warmup = min(cfg.warmup_steps, cfg.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: everything but norms' scales and biases."""
  def decays(path, _):
    name = getattr(path[-1], 'key', getattr(path[-1], 'name', ''))
    return name not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip(global norm) → AdamW with the schedule above; decay masked off norms and biases."""
  adamw = optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw
