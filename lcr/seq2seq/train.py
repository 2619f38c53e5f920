"""Training a seq2seq model: the jitted step of the configured tips, and a resumable loop.

Everything lcr's language-model trainer keeps is kept here too: AdamW with warmup and cosine decay
(lcr.optim), parameters sharded by their logical axes over ``mesh`` and the batch over its data
axes (lcr.sharding), orbax checkpoints of the state *and* the grain iterator (lcr.checkpoint), so
re-running the same command resumes exactly, ``config.json`` and ``metrics.jsonl``. Logged metrics:
``loss`` (cross-entropy per output token), ``guided``/``coverage`` (the auxiliary losses per output
token, when on), ``gold_probability`` (scheduled sampling's ε_i), ``lr``, ``grad_norm``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from lcr import checkpoint, metrics, optim, sharding
from lcr import train as lm_train
from lcr.config import Config, TrainConfig
from lcr.seq2seq import arch as arch_lib
from lcr.seq2seq import config as config_lib
from lcr.seq2seq import data, tips
from lcr.step import TrainState


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """The pieces every seq2seq loop shares: arch, optimizer, mesh and shardings."""
  config: Config
  arch: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  state_sharding: Any
  batch_sharding: Any

  def under_rules(self, fn: Callable) -> Callable:
    return sharding.under_rules(fn, self.mesh, self.config.mesh)

  def _state(self, rng) -> TrainState:
    params = nn.meta.unbox(self.arch.init(rng))
    return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

  def init_state(self) -> TrainState:
    """Fresh parameters and optimizer state from config.seed, created in their shards."""
    return _jitted_init(self)(jax.random.key(self.config.seed))

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self._state, jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_sharding)


@functools.lru_cache(maxsize=4)
def _jitted_init(setup: Setup):
  return jax.jit(setup._state, out_shardings=setup.state_sharding)


@functools.lru_cache(maxsize=4)
def make_setup(config: Config, train_cfg: TrainConfig | None = None) -> Setup:
  """Cached: training the same config again in this process reuses the compiled pieces."""
  train_cfg = train_cfg or config.train
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(mesh, config.mesh, train_cfg.batch_size)
  arch = arch_lib.make(config)
  tx = optim.optimizer(train_cfg)
  boxed = jax.eval_shape(arch.init, jax.random.key(0))
  params_sharding = sharding.logical_shardings(boxed, mesh, config.mesh)
  repl = sharding.replicated(mesh)
  opt_sharding = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, nn.meta.unbox(boxed)), params_sharding,
      transform_non_params=lambda _: repl)
  return Setup(config, arch, tx, optim.learning_rate(train_cfg), mesh,
               TrainState(repl, params_sharding, opt_sharding),
               sharding.batch_sharding(mesh, config.mesh))


def loss_fn(arch, params, batch, step, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy per output token under the configured regime, plus the auxiliary losses."""
  s = arch.tips
  scores = tips.REGIMES[s.training](arch, params, batch, step, rng)
  nll, tokens = tips.cross_entropy(scores)
  tokens = jnp.maximum(tokens, 1.0)
  ce = nll / tokens
  loss, logged = ce, {'loss': ce, 'gold_probability': tips.gold_probability(s, step)}
  if s.guided_weight:
    logged['guided'] = tips.guided_attention_loss(scores.attention, batch, s.guided_g) / tokens
    loss = loss + s.guided_weight * logged['guided']
  if s.coverage_weight:
    logged['coverage'] = tips.coverage_loss(scores.attention, scores.mask) / tokens
    loss = loss + s.coverage_weight * logged['coverage']
  return loss, logged


@functools.lru_cache(maxsize=4)
def make_train_step(setup: Setup):
  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(setup.config.seed), state.step)
    grad_fn = jax.value_and_grad(lambda p: loss_fn(setup.arch, p, batch, state.step, rng), has_aux=True)
    (_, logged), grads = grad_fn(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    return new, {**logged, 'grad_norm': optax.tree.norm(grads), 'lr': setup.schedule(state.step)}
  return jax.jit(setup.under_rules(train_step), in_shardings=(setup.state_sharding, setup.batch_sharding),
                 out_shardings=(setup.state_sharding, sharding.replicated(setup.mesh)), donate_argnums=0)


StepFn = Callable[[TrainState, dict[str, np.ndarray]], tuple[TrainState, dict[str, Any]]]


def run_loop(setup: Setup, workdir: str, train_cfg: TrainConfig, step_fn: StepFn,
             iterator: Iterator, tokens_per_step: int,
             init: Callable[[], TrainState] | None = None) -> dict[str, float]:
  """Resumes from ``workdir``'s latest checkpoint (or ``init``), runs to ``train_cfg.steps``."""
  lm_train.prepare_workdir(workdir)
  ckpt = checkpoint.Checkpointer(workdir, train_cfg.keep_checkpoints)
  try:
    start = ckpt.latest_step() or 0
    if start:
      saved = checkpoint.read_config(workdir)
      if saved is not None:
        checkpoint.check_compatible(saved, setup.config, workdir)
      state = ckpt.restore(start, setup.abstract_state(), iterator)
      logging.info('resumed from %s', ckpt.step_path(start))
    else:
      state = (init or setup.init_state)()
    checkpoint.write_config(workdir, setup.config)
    progress = metrics.Progress(train_cfg.steps, start, tokens_per_step)
    writer = metrics.MetricWriter(workdir, resume_step=start, tensorboard=train_cfg.tensorboard) \
        if jax.process_index() == 0 else None
    last: dict[str, float] = {}
    try:
      for step in range(start + 1, train_cfg.steps + 1):
        state, logged = step_fn(state, next(iterator))
        final = step == train_cfg.steps
        if step % train_cfg.log_every == 0 or final:
          last = {'step': step, **_host(logged, step, workdir), **progress.tick(step)}
          if writer is not None:
            writer.write(step, {k: v for k, v in last.items() if k not in ('step', 'eta_s')})
          logging.info('%s', progress.line(step, last))
        if final or (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0):
          ckpt.save(step, state, iterator)
          progress.pause(step)
    finally:
      if writer is not None:
        writer.close()
    return last
  finally:
    ckpt.close()


def _host(logged: dict[str, Any], step: int, workdir: str) -> dict[str, float]:
  host = {k: float(v) for k, v in jax.device_get(logged).items()}
  if not math.isfinite(host['loss']):
    raise lm_train.TrainingError(
        f'loss is {host["loss"]} at step {step}; checkpoints up to the last one before it are kept '
        f'in {workdir}: lower train.lr or raise train.warmup_steps, and start in a fresh --workdir')
  return host


def train(config: Config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the configured model and tips in ``workdir``; the last logged metrics."""
  config_lib.check_run(config)
  setup = make_setup(config)
  pack = 1 if config.seq2seq.training in tips.UNPACKED else None
  iterator = data.make_train_iterator(config, setup.arch, config.train.batch_size, pack=pack,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  train_step = make_train_step(setup)
  rows = sum(setup.arch.row_lengths().values()) // len(setup.arch.row_lengths())

  def step_fn(state, local):
    return train_step(state, sharding.global_batch(local, setup.batch_sharding))
  return run_loop(setup, workdir, config.train, step_fn, iterator,
                  config.train.batch_size * rows * (pack or config.seq2seq.task.pack))


def restore_params(workdir: str, config: Config, field: str = 'seq2seq.rl.init') -> Any:
  """The parameters of ``workdir``'s latest checkpoint, on the default device.

  A workdir without a finished checkpoint is a ConfigError naming ``field``.
  """
  directory = os.path.abspath(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
  step = None
  if os.path.isdir(directory):
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
  if step is None:
    config_lib.fail(field, workdir, 'holds no trained checkpoint (train the teacher-forced model '
                    'there first)')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: nn.meta.unbox(arch_lib.make(config).init(jax.random.key(0))))
  target = {'params': jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                   abstract)}
  args = ocp.args.Composite(**{checkpoint.STATE: ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)})
  try:
    restored = manager.restore(step, args=args)
  finally:
    manager.close()
  return restored[checkpoint.STATE]['params']
