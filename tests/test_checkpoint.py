"""Checkpoints: exact resumption (data order included), keep-last-K, corrupt and incompatible ones."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from lcr import checkpoint, cli, eval_workdir, metrics, step, train

COMPARED = ('loss', 'lr', 'grad_norm', 'val_loss')


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('data')
  return cli.load('configs/lm.py:smoke', [
      f'data.data_dir={data_dir}', 'train.steps=8', 'train.log_every=1', 'train.eval_every=4',
      'train.checkpoint_every=2', 'train.keep_checkpoints=2', 'train.tensorboard=false'])


@pytest.fixture(scope='module')
def reference(config, tmp_path_factory):
  """An uninterrupted run: its workdir."""
  workdir = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(config, str(workdir))
  return workdir


def compared(workdir) -> list[dict]:
  return [{k: r[k] for k in ('step', *COMPARED) if k in r} for r in metrics.read_metrics(str(workdir))]


def test_keeps_the_last_k_checkpoints_with_the_data_iterator(reference):
  assert sorted(os.listdir(reference / 'checkpoints'), key=int) == ['6', '8']
  assert (reference / 'checkpoints' / '8' / 'data_iter' / 'process_0-of-1.json').exists()


class _SigtermAt:
  """Wraps the training data: sends this process SIGTERM when batch ``at`` is drawn."""

  def __init__(self, data: train.Data, at: int):
    self.data, self.at, self.drawn = data, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.drawn += 1
    if self.drawn == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.data.train)

  def get_state(self):
    return self.data.train.get_state()

  def set_state(self, state):
    self.data.train.set_state(state)


def test_sigterm_saves_and_the_rerun_ends_with_the_uninterrupted_metrics(config, reference, tmp_path):
  """An invariant is the only reference here: preempted and resumed equals uninterrupted."""
  data = train.open_data(config)
  with pytest.raises(train.Preempted, match='after step 5'):
    train.train(train.with_vocab(config, data.vocab_size), str(tmp_path),
                train.Data(data.vocab_size, _SigtermAt(data, 5), data.validation))
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == ['4', '5']   # 5: the SIGTERM save
  assert [r['step'] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
  train.train_and_evaluate(config, str(tmp_path))
  assert compared(tmp_path) == compared(reference)          # bit for bit, data order included


def test_corrupt_checkpoint_is_named_kept_and_can_be_skipped(reference, config, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  for name in os.listdir(workdir / 'checkpoints' / '8' / 'state' / 'd'):
    (workdir / 'checkpoints' / '8' / 'state' / 'd' / name).write_bytes(b'garbage')
  before = (workdir / 'metrics.jsonl').read_text()
  config_json = (workdir / 'config.json').read_text()
  bad = str(workdir / 'checkpoints' / '8')
  with pytest.raises(checkpoint.CheckpointError) as err:
    train.train_and_evaluate(config, str(workdir))
  message = str(err.value)
  assert f'checkpoint {bad} is corrupt' in message and 'resume from step 6' in message
  assert '\n' not in message
  # Nothing was deleted or rewritten.
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['6', '8']
  assert (workdir / 'metrics.jsonl').read_text() == before
  assert (workdir / 'config.json').read_text() == config_json
  with pytest.raises(checkpoint.CheckpointError, match='checkpoints/8 is corrupt'):
    checkpoint.load_params(str(workdir))
  # Following the advice resumes from step 6 and reproduces the run.
  os.rename(bad, bad + '.corrupt')
  train.train_and_evaluate(config, str(workdir))
  assert compared(workdir) == compared(reference)


def test_reads_left_behind_by_a_failed_restore_are_not_reported(caplog):
  """asyncio reports a failed task nobody awaited when it is collected; after a failed restore
  those are orbax's other reads (coroutine async_deserialize), and only those are dropped."""
  import asyncio
  import gc
  import logging

  async def async_deserialize():
    raise ValueError('a damaged array')

  async def other_work():
    raise ValueError('something else')

  def orphan(coroutine):
    loop = asyncio.new_event_loop()
    task = loop.create_task(coroutine())
    loop.run_until_complete(asyncio.sleep(0))   # the task runs and fails; nobody retrieves it
    loop.close()
    del task
    gc.collect()

  checkpoint.drop_orphaned_read_reports()
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    orphan(async_deserialize)
    orphan(other_work)
  reports = [r.getMessage() for r in caplog.records if r.name == 'asyncio']
  assert len(reports) == 1 and 'other_work' in reports[0], reports


def test_resuming_with_another_model_is_refused(reference, config, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  before = (workdir / 'metrics.jsonl').read_text()
  other = cli.load('configs/lm.py:smoke', [f'data.data_dir={config.data.data_dir}',
                                           'model.d_model=48'])
  with pytest.raises(checkpoint.CheckpointError, match=r'model\.d_model=32.*model\.d_model=48'):
    train.train_and_evaluate(other, str(workdir))
  assert (workdir / 'metrics.jsonl').read_text() == before



@pytest.mark.parametrize('field, saved, resumed', [
    ('peft.rank', dict(peft=dict(method='lora', rank=8)), dict(peft=dict(method='lora', rank=4))),
    ('peft.method', dict(peft=dict(method='lora')), dict(peft=dict(method='adapter'))),
    ('model.moe.top_k', dict(model=dict(ffn='moe', moe=dict(top_k=2))),
     dict(model=dict(ffn='moe', moe=dict(top_k=1, renormalize=False)))),
])
def test_resuming_needs_the_same_peft_and_nested_model_fields(field, saved, resumed):
  """A LoRA run resumed with another rank or method, or an MoE run with another top_k, would load
  parameters of another shape or meaning: refused, naming the field."""
  from lcr.config import from_config_dict
  old, new = (from_config_dict({**c, 'data': {}}) for c in (saved, resumed))
  with pytest.raises(checkpoint.CheckpointError, match=field.replace('.', r'\.')):
    checkpoint.check_compatible(old, new, 'runs/x')
  checkpoint.check_compatible(old, old, 'runs/x')

def test_load_params_gives_the_trained_model(reference):
  """An invariant: the loaded parameters give the validation loss the run logged."""
  params, config = checkpoint.load_params(str(reference))
  assert config.model.vocab_size == 259            # set from the bytes tokenizer
  # Recomputing the final validation loss from the loaded parameters gives the logged one.
  trainer = step.make_trainer(config)
  data = train.open_data(config)
  params = jax.device_put(params, trainer.state_sharding.params)
  val = train.evaluate(trainer, params, data)
  np.testing.assert_allclose(val['val_loss'], metrics.read_metrics(str(reference))[-1]['val_loss'],
                             rtol=1e-6)


def test_workdir_without_a_run_is_explained(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='has no trained model'):
    checkpoint.load_params(str(tmp_path))


def test_eval_mode_scores_the_trained_model_at_each_length(reference, config):
  rows = eval_workdir.evaluate_workdir(str(reference), config.eval)
  assert [r['eval_len'] for r in rows] == [32, 64]
  assert all(np.isfinite(r['loss']) and r['tokens'] > 0 and r['step'] == 8 for r in rows)
  written = [json.loads(line) for line in (reference / 'eval.jsonl').read_text().splitlines()]
  assert written == rows
