"""The training loop: resume or initialise, step, log, evaluate, checkpoint, stop on SIGTERM.

``train_and_evaluate(config, workdir)`` is what run.py and the experiment driver call. Re-running it
with the same workdir resumes from the latest checkpoint, data order included, so an interrupted
run ends with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lcr import checkpoint, init_from, metrics, peft, sharding, step as step_lib
from lcr.config import Config, fail

LocalBatch = dict[str, np.ndarray]


class TrainingError(Exception):
  """The run cannot go on (e.g. a non-finite loss); the message names the step and what to try."""


class WorkdirError(Exception):
  """The workdir cannot be created or written."""


class Preempted(Exception):
  """SIGTERM (e.g. TPU VM preemption) arrived; a checkpoint of ``step`` was saved first."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f'stopped by SIGTERM after step {step}; checkpoint saved in {workdir}: '
                     'run the same command again to resume')
    self.step = step


@dataclasses.dataclass
class Data:
  """What training needs from the data room: batches hold this process's rows of each global batch.

  ``train`` must be checkpointable (``get_state``/``set_state``, e.g. a grain iterator);
  ``validation()`` returns the same held-out batches every time it is called.
  """
  vocab_size: int
  train: Iterator[LocalBatch]
  validation: Callable[[], Iterable[LocalBatch]]


def open_data(config: Config, process_index: int | None = None,
              process_count: int | None = None) -> Data:
  """The corpus, tokenizer and grain pipelines of ``config.data`` for one process (default: this).

  Validation batches are the first ``train.eval_batches`` batches of the ``eval.split`` split,
  packed like training rows and not shuffled.
  """
  import lcr.data  # only training needs the data room

  kwargs = dict(seq_len=config.train.seq_len, batch_size=config.train.batch_size, seed=config.seed,
                process_index=jax.process_index() if process_index is None else process_index,
                process_count=jax.process_count() if process_count is None else process_count)
  if config.data.task != 'lm':   # a synthetic retrieval task (lcr.data.tasks)
    from lcr.data import tasks
    task = tasks.get_task(config.data)
    held_out = tasks.validation_batches(task, num_batches=config.train.eval_batches, **kwargs)
    return Data(task.vocab_size, iter(tasks.make_task_dataset(task, **kwargs)), lambda: held_out)
  vocab_size = lcr.data.get_tokenizer(config.data).vocab_size   # trains BPE on the train split once
  train_iter = lcr.data.make_train_iterator(config.data, **kwargs)
  val_cfg = dataclasses.replace(config.data, train_split=config.eval.split, shuffle=False)
  val_iter = lcr.data.make_train_iterator(val_cfg, **kwargs)
  val_start = val_iter.get_state()

  def validation():
    val_iter.set_state(val_start)
    return (next(val_iter) for _ in range(config.train.eval_batches))

  return Data(vocab_size=vocab_size, train=train_iter, validation=validation)


def with_vocab(config: Config, vocab_size: int) -> Config:
  """``config`` with model.vocab_size set to the tokenizer's (recorded so in config.json)."""
  return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab_size))


def train_and_evaluate(config: Config, workdir: str) -> dict[str, float]:
  """Trains (resuming if ``workdir`` holds checkpoints) and returns the final metrics.

  The result holds the last step's ``step``, ``loss``, ``lr``, ``grad_norm`` and the validation
  loss at the training length, ``val_loss``.
  """
  data = open_data(config)
  return train(with_vocab(config, data.vocab_size), workdir, data)


def prepare_workdir(workdir: str) -> None:
  """Creates ``workdir`` and checks that files can be written there."""
  probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as err:
    raise WorkdirError(f'cannot write to --workdir={workdir} ({err.strerror or err}); choose a '
                       'directory you can write to') from err


def train(config: Config, workdir: str, data: Data) -> dict[str, float]:
  """``train_and_evaluate`` with the data given (and model.vocab_size already set)."""
  if config.model.arch != 'decoder':
    fail('model.arch', config.model.arch, "this trainer trains the decoder-only LM; the "
         "encoder-decoder trains with experiments/length_generalization.py (lcr.seq2seq)")
  trainer = step_lib.make_trainer(config)   # checks mesh.shape and train.batch_size first
  prepare_workdir(workdir)
  ckpt = checkpoint.Checkpointer(workdir, config.train.keep_checkpoints)
  try:
    start = ckpt.latest_step() or 0
    if start:
      saved = checkpoint.read_config(workdir)
      if saved is not None:
        checkpoint.check_compatible(saved, config, workdir)
      state = ckpt.restore(start, trainer.abstract_state(), data.train)
      logging.info('resumed from %s', ckpt.step_path(start))
    elif config.train.init_from:
      state = init_from.initial_state(trainer, config)
      logging.info('parameters from %s', config.train.init_from)
    else:
      state = trainer.init_state()
    checkpoint.write_config(workdir, config)
    trainable, _ = peft.count(config.peft, state.params)
    logging.info('%s parameters, %s trainable (%.2f%%); mesh %s', f'{trainer.num_params:,}',
                 f'{trainable:,}', 100 * trainable / trainer.num_params, dict(trainer.mesh.shape))
    if start >= config.train.steps:
      return {'step': start, **evaluate(trainer, state.params, data)}
    return _Loop(config, workdir, trainer, data, ckpt, start).run(state)
  finally:
    ckpt.close()


def evaluate(trainer: step_lib.Trainer, params: Any, data: Data) -> dict[str, float]:
  """Validation loss (mean over non-padding tokens) at the training length."""
  sums = [trainer.eval_step(params, sharding.global_batch(b, trainer.batch_sharding))
          for b in data.validation()]
  if not sums:
    return {}
  total = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *sums))
  tokens = float(total['sum_weights'])
  return {'val_loss': float(total['sum_loss']) / max(tokens, 1.0), 'val_tokens': tokens}


class _Preemption:
  """Has SIGTERM asked us to stop? One process: a signal flag. Several: JAX's preemption sync."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Loop:
  """One training run from ``start`` to ``train.steps``; metrics are fetched one step late."""

  def __init__(self, config: Config, workdir: str, trainer: step_lib.Trainer, data: Data,
               ckpt: checkpoint.Checkpointer, start: int):
    self.config, self.workdir, self.trainer, self.data, self.ckpt = (
        config, workdir, trainer, data, ckpt)
    self.start = start
    tc = config.train
    self.progress = metrics.Progress(tc.steps, start, tc.batch_size * tc.seq_len)
    self.writer = (metrics.MetricWriter(workdir, resume_step=start, tensorboard=tc.tensorboard)
                   if jax.process_index() == 0 else None)
    device = jax.devices()[0]
    peak = metrics.peak_flops(device.device_kind, config.model.dtype)
    flops = metrics.flops_per_token(config.model, trainer.num_params, tc.seq_len)
    self.flops_per_s_peak = peak * jax.device_count() if peak else None
    self.flops_per_token = flops
    self.last: dict[str, float] = {}

  def run(self, state: step_lib.TrainState) -> dict[str, float]:
    tc = self.config.train
    preemption = _Preemption()
    pending = None
    try:
      for step in range(self.start + 1, tc.steps + 1):
        batch = sharding.global_batch(next(self.data.train), self.trainer.batch_sharding)
        state, step_metrics = self.trainer.train_step(state, batch)
        if pending is not None:
          self._finish(*pending)
        pending = (step, step_metrics)
        last = step == tc.steps
        do_eval = last or (tc.eval_every and step % tc.eval_every == 0)
        do_save = last or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
        stop = preemption.requested(step)
        if do_eval or do_save or stop:
          self._finish(*pending, evaluate_params=state.params if do_eval else None)
          pending = None
        if do_save or stop:
          self.ckpt.save(step, state, self.data.train)
          self.progress.pause(step)
        if stop:
          self.ckpt.wait()
          raise Preempted(step, self.workdir)
    finally:
      preemption.close()
      if self.writer is not None:
        self.writer.close()
    return self.last

  def _finish(self, step: int, step_metrics: dict[str, jax.Array], evaluate_params=None) -> None:
    """Checks the step's loss; writes its record on log/eval steps."""
    tc = self.config.train
    host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if not math.isfinite(host['loss']):
      raise TrainingError(
          f'loss is {host["loss"]} at step {step} (grad_norm {host["grad_norm"]}); checkpoints up '
          f'to the last one before it are kept in {self.workdir}: lower train.lr, raise '
          'train.warmup_steps or set train.grad_clip, and start again in a fresh --workdir')
    record, eta = {}, math.inf
    if step % tc.log_every == 0 or step == tc.steps or evaluate_params is not None:
      timing = self.progress.tick(step)
      record = {k: host[k] for k in ('loss', 'lr', 'grad_norm')}
      if host['aux_loss']:
        record['aux_loss'] = host['aux_loss']
      record.update({k: v for k, v in host.items() if k.startswith('moe_')})   # lcr.moe.summarize
      record.update(tokens_per_s=timing['tokens_per_s'], step_time_s=timing['step_time_s'])
      if self.flops_per_s_peak:
        record['mfu'] = self.flops_per_token * timing['tokens_per_s'] / self.flops_per_s_peak
      eta = timing['eta_s']
    if evaluate_params is not None:
      record.update(evaluate(self.trainer, evaluate_params, self.data))
      self.progress.pause(step)
    if not record:
      return
    if self.writer is not None:
      self.writer.write(step, record)
      logging.info('%s', self.progress.line(step, {**record, 'eta_s': eta}))
    self.last = {'step': step, **record}
