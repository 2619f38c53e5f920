"""The study end to end (smoke preset), its resumption, and the sweep launcher's dry run."""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from lcr import results, study
from lcr.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


extrapolation_config = _load('configs/extrapolation.py', 'extrapolation_config')
sweep = _load('experiments/sweep.py', 'sweep_launcher')


def _smoke(data_dir):
  config = extrapolation_config.get_config('smoke')
  config.data.data_dir = str(data_dir)
  return config


@pytest.fixture(scope='module')
def smoke_study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('study'))
  data_dir = tmp_path_factory.mktemp('data')
  written = study.run_study(_smoke(data_dir), workdir)
  return workdir, data_dir, written


def test_smoke_study_writes_every_row_and_figure(smoke_study):
  """End to end: every row, file and figure is written. What a row's numbers are is checked
  against references in test_evaluate (the Evaluator) and test_positional (the scalings)."""
  workdir, _, written = smoke_study
  assert sorted(written) == ['extrapolation.png', 'passkey.png', 'per_position.png', 'summary.md']
  rows = results.read_rows(os.path.join(workdir, results.RESULTS))
  for row in rows:
    results.check_result_row(row)
    assert row['tokens'] == 256 and row['bytes'] > 0 and row['ppl'] > 1
  got = sorted((r['variant'], r['rope_scaling'], r['protocol'], r['eval_len']) for r in rows)
  assert got == sorted([('learned', 'none', 'nonoverlapping', 48), ('learned', 'none', 'nonoverlapping', 96)]
                       + [('rope', s, 'nonoverlapping', n) for s in ('none', 'yarn') for n in (48, 96)])
  learned = [r for r in rows if r['variant'] == 'learned']
  assert {r['learned_positions'] for r in learned} == {'clamp'}
  assert {r['learned_positions'] for r in rows if r['variant'] == 'rope'} == {None}
  yarn = {r['eval_len']: r for r in rows if r['rope_scaling'] == 'yarn'}
  none = {r['eval_len']: r for r in rows if r['variant'] == 'rope' and r['rope_scaling'] == 'none'}
  assert yarn[48]['rope_factor'] == 1.0 and yarn[48]['loss'] == none[48]['loss']   # factor 1
  assert yarn[96]['rope_factor'] == 2.0 and yarn[96]['loss'] != none[96]['loss']
  per_position = results.read_rows(os.path.join(workdir, results.PER_POSITION))
  assert {results.row_key(r) for r in per_position} == {results.row_key(r) for r in rows}
  assert all(len(r['loss']) == r['eval_len'] == len(r['count']) for r in per_position)
  passkey_rows = results.read_rows(os.path.join(workdir, results.PASSKEY))
  # (learned, rope, rope + yarn) × 2 depths at length 64 × (teacher-forced, generated)
  assert len(passkey_rows) == 3 * 2 * 2
  by_mode = {}
  for r in passkey_rows:
    by_mode.setdefault(r['mode'], {})[(r['variant'], r['rope_scaling'], r['depth'])] = r
  assert sorted(by_mode) == ['generate', 'teacher_forced']
  for key, forced in by_mode['teacher_forced'].items():   # greedy generation is exact iff every
    assert by_mode['generate'][key]['correct'] == forced['correct']   # answer token is the argmax
  assert 'Passkey' in open(written['summary.md']).read()


def test_rerun_reuses_models_and_evaluations(smoke_study, monkeypatch):
  workdir, data_dir, _ = smoke_study
  sizes = {name: os.path.getsize(os.path.join(workdir, name))
           for name in (results.RESULTS, results.PER_POSITION, results.PASSKEY)}

  def no_training(*args, **kwargs):
    raise AssertionError('a finished model was trained again')
  monkeypatch.setattr(study, 'train_variant', no_training)
  study.run_study(_smoke(data_dir), workdir)
  assert sizes == {name: os.path.getsize(os.path.join(workdir, name)) for name in sizes}


def test_interrupted_evaluation_continues_where_it_stopped(smoke_study, tmp_path):
  workdir, data_dir, _ = smoke_study
  rows = results.read_rows(os.path.join(workdir, results.RESULTS))
  copy = str(tmp_path / 'copy')
  os.makedirs(copy)
  os.symlink(os.path.join(workdir, study.MODELS_DIR), os.path.join(copy, study.MODELS_DIR))
  results.append_rows(os.path.join(copy, results.RESULTS), rows[:2])     # stopped after two rows
  results.append_rows(os.path.join(copy, results.PASSKEY),
                      results.read_rows(os.path.join(workdir, results.PASSKEY)))
  study.run_study(_smoke(data_dir), copy)
  again = results.read_rows(os.path.join(copy, results.RESULTS))
  assert sorted(map(results.row_key, again)) == sorted(map(results.row_key, rows))
  os.remove(os.path.join(copy, 'extrapolation.png'))
  written = study.run_study(_smoke(data_dir), copy, plots_only=True)
  assert os.path.exists(written['extrapolation.png'])


def test_variant_config_and_study_validation(tmp_path):
  config = _smoke(tmp_path)
  values, spec = study.split_config(config)
  learned = study.variant_config(values, spec, 'learned')
  assert learned.model.pos == 'learned' and learned.model.max_len == 96   # longest length
  config.study.overrides = {'rope': {'model': {'rope_base': 500.0}}}
  values, spec = study.split_config(config)
  assert study.variant_config(values, spec, 'rope').model.rope_base == 500.0
  config.study.variants = 'rope, alibi'
  assert study.split_config(config)[1].variants == ('rope', 'alibi')
  for field, bad in (('variants', 'rope,rope'), ('parallel', 0), ('passkey_mix', 1.5)):
    broken = _smoke(tmp_path)
    broken.study[field] = bad
    with pytest.raises(ConfigError, match=f'study.{field}'):
      study.split_config(broken)


def test_sweep_expands_into_distinct_runs():
  runs = sweep.expand('configs/extrapolation.py:quick')
  assert len(runs) == 6 * 2 * 2                      # variants × seeds × training lengths
  assert len({r.name for r in runs}) == len(runs)
  assert runs[0].name == 'variants_sinusoidal-seed_0-seq_len_64'


def test_sweep_dry_run_prints_exact_commands():
  def dry(*args):
    out = subprocess.run([sys.executable, 'experiments/sweep.py', *args, '--dry_run'], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()
  local = dry('--config=configs/extrapolation.py:smoke', '--workdir=runs/s', '--set=train.steps=2')
  assert local == [
      'python experiments/extrapolation.py --config=configs/extrapolation.py:smoke '
      '--workdir=runs/s/variants_rope-seed_0-seq_len_48 --config.study.variants=rope --config.seed=0 '
      '--config.train.seq_len=48 --config.train.steps=2',
      'python experiments/extrapolation.py --config=configs/extrapolation.py:smoke '
      '--workdir=runs/s/variants_rope-seed_1-seq_len_48 --config.study.variants=rope --config.seed=1 '
      '--config.train.seq_len=48 --config.train.steps=2',
      'python experiments/extrapolation.py --config=configs/extrapolation.py:smoke '
      '--workdir=runs/s/variants_learned-seed_0-seq_len_48 --config.study.variants=learned '
      '--config.seed=0 --config.train.seq_len=48 --config.train.steps=2',
      'python experiments/extrapolation.py --config=configs/extrapolation.py:smoke '
      '--workdir=runs/s/variants_learned-seed_1-seq_len_48 --config.study.variants=learned '
      '--config.seed=1 --config.train.seq_len=48 --config.train.steps=2',
      'python experiments/sweep.py --config=configs/extrapolation.py:smoke --workdir=runs/s --combine_only']
  tpu = dry('--config=configs/extrapolation.py:smoke', '--workdir=/data/s', '--launcher=tpu_vm',
            '--tpu=lcr-v4', '--zone=us-central2-b', '--repo_dir=~/lcr')
  assert len(tpu) == 5
  first = shlex.split(tpu[0])
  assert first[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'lcr-v4', '--zone=us-central2-b',
                       '--worker=all']
  assert first[8] == ('--command=cd ~/lcr && python3 experiments/extrapolation.py '
                      '--config=configs/extrapolation.py:smoke --workdir=/data/s/variants_rope-seed_0-seq_len_48 '
                      '--config.study.variants=rope --config.seed=0 --config.train.seq_len=48')
  last = shlex.split(tpu[-1])
  assert '--worker=0' in last and last[-1].endswith('--workdir=/data/s --combine_only')


def test_worker_processes_run_each_variant_pinned_and_report_failures(tmp_path):
  code = ('import os, sys; from lcr import study; study.pin_worker(); v = sys.argv[-1].split("=")[1]; '
          f'open(os.path.join({str(tmp_path)!r}, v + ".out"), "w").write('
          'str(len(os.sched_getaffinity(0))) + os.environ["XLA_FLAGS"]); sys.exit(v == "bad")')
  study.run_parallel([sys.executable, '-c', code], ['a', 'b', 'c'], str(tmp_path), 2)
  for v in 'abc':
    out = open(tmp_path / f'{v}.out').read()
    assert out.startswith('1') and out.endswith(study.SINGLE_THREAD_XLA_FLAGS)   # one core each
  with pytest.raises(study.StudyError, match=r"\['bad'\] failed.*bad.log"):
    study.run_parallel([sys.executable, '-c', code], ['d', 'bad'], str(tmp_path), 2)


@pytest.mark.parametrize('variants, message', [((), 'distinct variant names'),
                                               (('rope', 'rope'), 'distinct variant names'),
                                               (('rope', 'a/b'), 'directory names')])
def test_variant_names_are_distinct_directory_names(variants, message):
  """Both studies (lcr.study, lcr.seq2seq.study) name a model directory after each variant."""
  with pytest.raises(ConfigError, match=f'study.variants.*{message}'):
    study.check_variant_names(variants)
  study.check_variant_names(('rope', 'alibi-2', 'x.y_z'))
