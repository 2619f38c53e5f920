"""``train.init_from``: a new run starts from the parameters of another.

Only the parameters come over: the optimizer state starts afresh and the data from its first
batch. The source is a workdir (config.json and checkpoints/), its checkpoints/ directory (the
latest step) or one step's directory in it. A LoRA source is merged into its base weights first.
Every parameter of the source must exist in the new model with the same shape; the new model may
add parameters only where PEFT adds them (LoRA, adapters), which keep their fresh initialisation.
A learned position table that the new run makes longer keeps its trained rows and takes the rest
from the new initialisation when ``train.init_extend_positions`` is set.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcr import checkpoint, peft
from lcr.config import Config, fail

FIELD = 'train.init_from'
POSITION_TABLE = 'absolute_position/pos_embedding'


def resolve(path: str) -> tuple[str, int | None]:
  """(workdir, step or None for the latest) that ``train.init_from=path`` names."""
  path = os.path.normpath(os.path.expanduser(path))
  parent = os.path.dirname(path)
  has_config = lambda d: os.path.isfile(os.path.join(d, checkpoint.CONFIG_FILE))   # noqa: E731
  if os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_DIR)) and has_config(path):
    return path, None
  if os.path.basename(path) == checkpoint.CHECKPOINT_DIR and has_config(parent):
    return parent, None
  grandparent = os.path.dirname(parent)
  if (os.path.basename(path).isdigit() and os.path.basename(parent) == checkpoint.CHECKPOINT_DIR
      and os.path.isdir(path) and has_config(grandparent)):
    return grandparent, int(os.path.basename(path))
  why = 'does not exist' if not os.path.exists(path) else 'is not a trained run'
  fail(FIELD, path, f'{why}: give a workdir (config.json and checkpoints/), its checkpoints/ '
       'directory, or one step directory inside it')


def load_source(path: str) -> tuple[Any, Config]:
  """(parameters, config) of the run ``path`` names; LoRA merged into the base weights."""
  workdir, step = resolve(path)
  try:
    params, saved = checkpoint.load_params(workdir, step)
  except checkpoint.CheckpointError as err:
    fail(FIELD, path, str(err))
  if saved.peft.method == 'lora':
    params = peft.merge(saved.peft, params)
  return params, saved


def _extend_rows(name: str, source: np.ndarray, fresh: Any, extend: bool, origin: str) -> np.ndarray:
  """The learned position table grown to ``fresh``'s rows, or a shape error naming the options."""
  if name.endswith(POSITION_TABLE) and source.shape[1:] == fresh.shape[1:]:
    if source.shape[0] < fresh.shape[0] and extend:
      return np.concatenate([source, np.asarray(fresh)[source.shape[0]:]])
    hint = ('set train.init_extend_positions=true to keep its trained rows and initialise the rest'
            if source.shape[0] < fresh.shape[0] else 'the new table is shorter')
  else:
    hint = 'use the same model shape (or a PEFT method, which only adds parameters)'
  fail(FIELD, origin, f'{name} has shape {source.shape} there but {fresh.shape} in this model; {hint}')


def transfer(source: Any, fresh: Any, *, extend_positions: bool = False, origin: str = '') -> Any:
  """``fresh`` (this model's initial parameters) with every parameter of ``source`` put in place.

  Raises a ConfigError naming train.init_from when a source parameter is missing here, when this
  model has a base parameter the source lacks, or when shapes differ (see the module docstring);
  ``origin`` is the train.init_from value the messages name.
  """
  flat_source = {peft.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(source)}
  paths = [peft.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(fresh)]
  extra = sorted(set(flat_source) - set(paths))
  if extra:
    fail(FIELD, origin, f'the run there has parameters this model lacks: {", ".join(extra[:8])}')
  missing = sorted(p for p in paths if p not in flat_source and not peft.is_peft_param(p))
  if missing:
    fail(FIELD, origin, f'this model has parameters the run there lacks: {", ".join(missing[:8])}')

  def take(path, value):
    name = peft.path_name(path)
    if name not in flat_source:
      return value
    got = np.asarray(flat_source[name])
    if got.shape != value.shape:
      got = _extend_rows(name, got, value, extend_positions, origin)
    return jnp.asarray(got, value.dtype)
  return jax.tree_util.tree_map_with_path(take, fresh)


def initial_state(trainer: Any, config: Config) -> Any:
  """The first train state of a run with ``train.init_from``: the source's parameters (and fresh
  PEFT parameters) in this run's shardings, optimizer state initialised for them."""
  source, _ = load_source(config.train.init_from)
  state = trainer.init_state()
  params = transfer(source, jax.device_get(state.params),
                    extend_positions=config.train.init_extend_positions,
                    origin=config.train.init_from)
  params = jax.device_put(params, trainer.state_sharding.params)
  opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_sharding.opt_state)(params)
  return state.replace(params=params, opt_state=opt_state)
