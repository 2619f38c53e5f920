"""The study's retrieval-task jobs and its extension phase end to end (smoke_phases preset)."""

import importlib.util
import os
import shutil
import sys

import pytest

from lcr import plots, results, study
from lcr.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('extrapolation_phases_config',
                                               os.path.join(REPO, 'configs/extrapolation.py'))
presets = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = presets
_spec.loader.exec_module(presets)

LORA_RUN = 'lm-rope.linear.lora.L96.s2'


def _config(data_dir):
  config = presets.get_config('smoke_phases')
  config.data.data_dir = str(data_dir)
  return config


@pytest.fixture(scope='module')
def phases(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('phases'))
  data_dir = tmp_path_factory.mktemp('data')
  written = study.run_study(_config(data_dir), workdir)
  return workdir, data_dir, written


def _rows(workdir, name):
  return results.read_rows(os.path.join(workdir, name))


def test_every_task_trains_its_own_model_and_writes_its_rows(phases):
  workdir, _, written = phases
  assert sorted(os.listdir(os.path.join(workdir, 'models'))) == ['extend', 'lm-rope', 'mqar-rope']
  assert {r['variant'] for r in _rows(workdir, results.RESULTS)} == {'rope'}
  recall = _rows(workdir, results.RECALL)
  assert sorted((r['rope_scaling'], r['eval_len'], r['depth']) for r in recall) == sorted(
      (s, n, d) for s in ('none', 'linear') for n in (48, 96) for d in (0.0, 1.0))
  for r in recall:
    assert (r['task'], r['mode'], r['variant'], r['train_len'], r['trials']) == (
        'mqar', 'teacher_forced', 'rope', 48, 2)
    assert 0 <= r['accuracy'] <= r['answer_accuracy'] <= 1
  assert {r['rope_factor'] for r in recall if r['rope_scaling'] == 'linear'} == {1.0, 2.0}
  assert {'recall.png', 'extension.png', 'summary.md'} <= set(written)


def test_directions_report_joins_each_variants_language_model_and_recall(phases, tmp_path):
  """experiments/directions_report.py on a study with tasks: perplexity from models/lm-<variant>'s
  rows, MQAR recall (RoPE scaling 'none') averaged over depths, by length."""
  import json
  import subprocess
  workdir = str(tmp_path / 'study')
  shutil.copytree(phases[0], workdir, ignore=shutil.ignore_patterns('extend', 'mqar-rope'))
  # Recall rows whose two scores differ from row to row (a 3-step model recalls nothing).
  rows = _rows(workdir, results.RECALL)
  for i, r in enumerate(rows):
    r.update(accuracy=i / 16, answer_accuracy=0.5 + i / 32)
  os.remove(os.path.join(workdir, results.RECALL))
  results.append_rows(os.path.join(workdir, results.RECALL), rows)
  out = subprocess.run([sys.executable, os.path.join(REPO, 'experiments/directions_report.py'),
                        f'--workdir={workdir}'], capture_output=True, text=True, check=True).stdout
  (row,) = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
  ppl = {r['eval_len']: r['ppl'] for r in _rows(workdir, results.RESULTS)
         if r['protocol'] == 'nonoverlapping' and r['rope_scaling'] == 'none'}
  assert (row['variant'], row['model'], row['train_len'], row['ppl_1L']) == (
      'rope', 'attention, rope', 48, ppl[48])
  recall = [r for r in _rows(workdir, results.RECALL) if r['rope_scaling'] == 'none']
  for length in (48, 96):
    at = [r for r in recall if r['eval_len'] == length]
    assert row['mqar'][str(length)] == pytest.approx({
        'accuracy': sum(r['accuracy'] for r in at) / len(at),
        'answers': sum(r['answer_accuracy'] for r in at) / len(at)})
  assert '| MQAR 48 (answers) | MQAR 96 (answers) |' in out


def test_extension_rows_carry_the_fine_tune(phases):
  workdir, _, _ = phases
  rows = _rows(workdir, results.EXTENSION)
  assert sorted((r['finetune_method'], r['finetune_steps'], r['eval_len']) for r in rows) == [
      ('lora', s, n) for s in (1, 2) for n in (48, 96)]   # eval_every=1
  for r in rows:
    assert (r['variant'], r['rope_scaling'], r['rope_factor'], r['finetune_len'],
            r['train_len']) == ('rope', 'linear', 2.0, 96, 48)
    assert r['ppl'] > 1 and r['tokens'] == 256
  by_step = {(r['finetune_steps'], r['eval_len']): r['ppl'] for r in rows}
  assert by_step[(1, 96)] != by_step[(2, 96)]                   # two different checkpoints
  lora = rows[0]
  # LoRA on q, k, v and out of one layer, d_model 32 (2 heads of 16), rank 8: 4 · 8 · (32 + 32).
  assert lora['trainable_params'] == 4 * 8 * 64 and lora['total_params'] > 4 * 8 * 64
  from lcr import checkpoint
  saved = checkpoint.read_config(os.path.join(workdir, 'models', 'extend', LORA_RUN))
  assert saved.train.init_from == os.path.join(workdir, 'models', 'lm-rope')
  assert (saved.peft.method, saved.model.rope_scaling, saved.train.seq_len) == ('lora', 'linear', 96)


def test_figures_and_tables_come_from_the_result_files_alone(phases, tmp_path):
  workdir, _, _ = phases
  for name in (results.RESULTS, results.RECALL, results.EXTENSION):
    shutil.copy(os.path.join(workdir, name), tmp_path / name)
  written = plots.draw_all([str(tmp_path)], str(tmp_path))
  assert {'extension.png', 'recall.png', 'summary.md'} <= set(written)
  summary = open(written['summary.md']).read()
  lora = {r['eval_len']: r for r in _rows(workdir, results.EXTENSION)
          if r['finetune_method'] == 'lora' and r['finetune_steps'] == 2}
  share = 100 * lora[48]['trainable_params'] / lora[48]['total_params']
  assert (f'| rope | linear | lora | 2 | {share:.1f} % | {lora[48]["ppl"]:.2f} | '
          f'{lora[96]["ppl"]:.2f} |') in summary
  before = {r['eval_len']: r['ppl'] for r in _rows(workdir, results.RESULTS)
            if r['rope_scaling'] == 'linear'}
  assert f'| rope | linear | eval-time only | 0 | — | {before[48]:.2f} | {before[96]:.2f} |' in summary
  assert '## Recall (answers recalled) (%), depth 0' in summary
  lora_96 = {r['finetune_steps']: r['ppl'] for r in _rows(workdir, results.EXTENSION)
             if r['finetune_method'] == 'lora' and r['eval_len'] == 96}
  assert (f'| rope | linear | lora | {before[96]:.2f} | {lora_96[1]:.2f} | {lora_96[2]:.2f} |'
          in summary)                                         # by fine-tuning step


def test_a_half_done_extension_phase_resumes_without_retraining(phases, tmp_path, monkeypatch):
  workdir, data_dir, _ = phases
  copy = tmp_path / 'copy'
  (copy / 'models' / 'extend').mkdir(parents=True)
  for name in ('lm-rope', 'mqar-rope', f'extend/{LORA_RUN}'):
    os.symlink(os.path.join(workdir, 'models', name), copy / 'models' / name)
  for name in (results.RESULTS, results.PER_POSITION, results.RECALL):
    shutil.copy(os.path.join(workdir, name), copy / name)
  rows = _rows(workdir, results.EXTENSION)
  results.append_rows(str(copy / results.EXTENSION), rows[:-1])       # stopped before the last

  def no_training(*args, **kwargs):
    raise AssertionError('a finished model was trained again')
  from lcr import train
  monkeypatch.setattr(train, 'train', no_training)
  study.run_study(_config(data_dir), str(copy))
  again = _rows(str(copy), results.EXTENSION)
  key = lambda r: results.row_key(r, results.EXTENSION_KEY_FIELDS)   # noqa: E731
  assert sorted(map(key, again)) == sorted(map(key, rows))


def test_study_overrides_of_a_task_apply_to_its_models(tmp_path):
  config = _config(tmp_path)
  config.study.overrides = {'mqar': {'train': {'steps': 7}}, 'rope': {'train': {'lr': 0.5}}}
  values, spec = study.split_config(config)
  mqar, lm = (study.variant_config(values, spec, 'rope', task) for task in ('mqar', 'lm'))
  assert (mqar.train.steps, mqar.train.lr, mqar.data.task) == (7, 0.5, 'mqar')
  assert (lm.train.steps, lm.train.lr, lm.data.task) == (3, 0.5, 'lm')
  config.study.overrides = {'copy': {}}
  with pytest.raises(ConfigError, match=r"study.overrides names \['copy'\]"):
    study.split_config(config)


def test_study_overrides_of_a_model_apply_last():
  """'<task>-<variant>' names one model: it overrides its task's and its variant's settings."""
  values, spec = study.split_config(presets.get_config('directions'))
  runs = {job.name: study.variant_config(values, spec, job.variant, job.task) for job in spec.jobs()}
  assert len(runs) == 14
  for memory in ('xl', 'infini'):
    lm, mqar = runs[f'lm-{memory}'], runs[f'mqar-{memory}']
    assert lm.model.memory == mqar.model.memory == memory
    assert (lm.data.contiguous, lm.data.shuffle, lm.data.task) == (True, False, 'lm')
    assert (mqar.data.contiguous, mqar.data.shuffle, mqar.data.task) == (False, True, 'mqar')
  mqar_train = {(c.train.steps, c.train.lr, c.train.min_lr_ratio)
                for n, c in runs.items() if n.startswith('mqar')}
  assert mqar_train == {(500, 1e-3, 1.0)}
  assert {c.train.steps for n, c in runs.items() if n.startswith('lm')} == {300}
  assert runs['mqar-ssm'].model.mixer == 'ssm' and runs['mqar-rope'].model.pos == 'rope'
  # Both of the slowest variant's models start first, one per worker.
  assert study._longest_first(values, spec)[:2] == ['lm-ssm', 'mqar-ssm']
  config = presets.get_config('directions')
  config.study.overrides['mqar-gru'] = {}
  with pytest.raises(ConfigError, match=r"study.overrides names \['mqar-gru'\]"):
    study.split_config(config)


def test_a_contiguous_stream_of_task_examples_is_refused():
  from lcr.data.config import DataConfig
  with pytest.raises(ConfigError, match=r"data.contiguous.*data.task='mqar'"):
    DataConfig(task='mqar', contiguous=True, shuffle=False)


@pytest.mark.parametrize('extend, message', [
    ({'scalings': 'dynamic_ntk'}, 'study.extend.scalings'),
    ({'methods': 'prefix'}, 'study.extend.methods'),
    ({'factor': 1}, 'study.extend.factor'),
    ({'steps': 0}, 'study.extend.steps'),
    ({'eval_every': 5}, 'study.extend.eval_every'),
    ({'variants': 'rope'}, "study.extend.variants names 'rope'"),
    ({'variants': 'mqar-rope'}, 'fine-tunes language models'),
    ({'lenght': 2}, 'study.extend.lenght does not exist'),
])
def test_bad_extend_config_is_one_error_naming_the_field(extend, message, tmp_path):
  config = _config(tmp_path)
  config.study.extend.update({k: v for k, v in extend.items() if k in config.study.extend})
  if 'lenght' in extend:
    with config.study.extend.unlocked():
      config.study.extend.lenght = 2
  with pytest.raises(ConfigError, match=message):
    study.run_study(config, str(tmp_path / 'w'))
