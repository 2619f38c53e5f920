"""orbax checkpoints of the train state and the data iterator; parameters for evaluation.

Layout: ``workdir/checkpoints/<step>/{state,data_iter}`` next to ``workdir/config.json``. A
checkpoint is never deleted because it failed to load: the error names it and says how to go on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

from lcr.config import Config, ConfigError, from_config_dict, to_dict

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
STATE, DATA_ITER = 'state', 'data_iter'


class CheckpointError(Exception):
  """A checkpoint or workdir that cannot be used; the message names it and says what to do."""


def _corrupt(path: str, err: BaseException, earlier: int | None) -> CheckpointError:
  how = (f'move it out of the way (mv {path} {path}.corrupt) to resume from step {earlier}'
         if earlier is not None else
         f'move it out of the way (mv {path} {path}.corrupt) to start afresh')
  return CheckpointError(f'checkpoint {path} is corrupt or incompatible with this config '
                         f'({type(err).__name__}: {_first_line(err)}); it was left untouched: '
                         f'{how}, or use another --workdir')


def _first_line(err: BaseException) -> str:
  text = str(err).strip()
  return text.splitlines()[0][:300] if text else repr(err)


class _IteratorState:
  """A grain iterator's state captured when a save starts, so later batches cannot leak into it.

  Written and read by grain's orbax handler in grain's own per-process JSON format.
  """

  def __init__(self, iterator: Any):
    self.iterator = iterator
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes) -> None:
    current = self.iterator.get_state()
    self.iterator.set_state(state if isinstance(current, bytes) else json.loads(state))

  def start_prefetch(self) -> None:
    if hasattr(self.iterator, 'start_prefetch'):
      self.iterator.start_prefetch()


class Checkpointer:
  """Saves and restores (train state, data iterator) under workdir/checkpoints; keeps the last K."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_iter: Any) -> None:
    """Starts an asynchronous save (arrays are copied off the device before this returns)."""
    self._manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave(state),
        DATA_ITER: grain_checkpoint.CheckpointSave(_IteratorState(data_iter))}), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
    """The state saved at ``step`` laid out like ``abstract_state``; ``data_iter`` is rewound too."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    args = ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
        DATA_ITER: grain_checkpoint.CheckpointRestore(_IteratorState(data_iter))})
    return _restore_or_explain(self._manager, step, args, self.step_path(step),
                               abstract_state)[STATE]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _restore_or_explain(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite,
                        path: str, abstract_state: Any) -> Any:
  """manager.restore, turning any failure into a CheckpointError that says how to go on."""
  with _quiet_closed_loop_reports():
    try:
      restored = manager.restore(step, args=args)
      _check_shapes(restored[STATE], abstract_state)
    except Exception as err:  # orbax/tensorstore raise many types for damaged files
      drop_orphaned_read_reports()
      time.sleep(0.5)   # let the other in-flight reads report while their reports are dropped
      earlier = [s for s in manager.all_steps() if s < step]
      raise _corrupt(path, err, max(earlier) if earlier else None) from err
  return restored


@contextlib.contextmanager
def _quiet_closed_loop_reports():
  """Drops 'Event loop is closed' reports of tensorstore reads that outlive a failed restore.

  When one read fails, orbax closes its event loop while the others are in flight; each then
  reports a RuntimeError through sys.unraisablehook, which would bury the one-line error.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and 'Event loop is closed' in str(unraisable.exc_value)):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


class _OrphanedReadFilter(logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' for orbax's array reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ('exception was never retrieved' in text and 'async_deserialize' in text)


def drop_orphaned_read_reports() -> None:
  """After a failed restore, keeps asyncio quiet about the reads it left behind.

  The other reads of a failed restore fail too, and nobody awaits them: asyncio reports each with
  a traceback when its task is collected, often at exit, after the one-line error. The filter stays
  on the 'asyncio' logger from then on (the process is ending, or has given up on this restore).
  """
  asyncio_logger = logging.getLogger('asyncio')
  if not any(isinstance(f, _OrphanedReadFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_OrphanedReadFilter())


def _check_shapes(restored: Any, abstract: Any) -> None:
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored),
                               jax.tree.leaves(abstract)):
    if got.shape != want.shape:
      raise ValueError(f'{jax.tree_util.keystr(path)} has shape {got.shape} in the checkpoint '
                       f'but {want.shape} in this config')


# ----------------------------------------------------------------------------------------------
# config.json and evaluation-time loading.


def write_config(workdir: str, config: Config) -> None:
  """workdir/config.json: the resolved config (written atomically, on process 0)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(to_dict(config), f, indent=2)
  os.replace(path + '.tmp', path)


def read_config(workdir: str) -> Config | None:
  """The Config recorded in workdir/config.json, or None if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return from_config_dict(json.load(f))
  except (json.JSONDecodeError, ConfigError, TypeError) as err:
    raise CheckpointError(f'{path} is not a config this version of lcr can read ({err}); '
                          'use another --workdir') from err


def _flat(values: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'moe': {'top_k': 2}} → {'moe.top_k': 2}: nested sections (model.moe) field by field."""
  out = {}
  for k, v in values.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def check_compatible(saved: Config, config: Config, workdir: str) -> None:
  """Resuming needs the same model and PEFT setup: fails naming the first field that differs."""
  for section in ('model', 'peft'):
    old, new = _flat(to_dict(getattr(saved, section))), _flat(to_dict(getattr(config, section)))
    for name in old:
      if old[name] != new.get(name):
        raise CheckpointError(
            f'{workdir} holds a run with {section}.{name}={old[name]!r}, but this config has '
            f'{section}.{name}={new.get(name)!r}; resume with the same {section} config or use '
            'another --workdir')


def load_params(workdir: str, step: int | None = None) -> tuple[Any, Config]:
  """(params, Config) of the latest (or given) checkpoint in ``workdir``; no optimizer state.

  The parameters come back as host-local arrays on the default device, ready for evaluation.
  """
  from lcr import peft, step as step_lib  # the model and optimizer are only needed here

  config = read_config(workdir)
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if config is None or not os.path.isdir(directory):
    raise CheckpointError(f'{workdir} has no trained model ({CONFIG_FILE} and {CHECKPOINT_DIR}/ '
                          'are written by training); train first or pass the right --workdir')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{directory} holds no finished checkpoint; train first')
  model = peft.build_model(config)   # with the run's LoRA or adapter parameters, if any
  device = jax.devices()[0]
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(device)),
      step_lib.abstract_params(model, config.train.seq_len))
  target = {'params': abstract}
  args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)})
  try:
    restored = _restore_or_explain(manager, step, args, os.path.join(directory, str(step)), target)
  finally:
    manager.close()
  return restored[STATE]['params'], config

