"""run.py end to end: SIGTERM and resume, and one clear line (no traceback) for each bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lcr import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ('step', 'loss', 'lr', 'grad_norm', 'val_loss')


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp('jax_cache')
  # One device, as a user's laptop has; compiled steps are shared between the runs of this module.
  return dict({k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, JAX_PLATFORMS='cpu',
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def command(workdir, data_dir, *overrides):
  return [sys.executable, 'run.py', '--config=configs/lm.py:smoke', f'--workdir={workdir}',
          '--mode=train', f'--config.data.data_dir={data_dir}', '--config.train.tensorboard=false',
          *overrides]


def run(args, env, timeout=180):
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


LONG = ('--config.train.steps=300', '--config.train.log_every=10', '--config.train.eval_every=100',
        '--config.train.checkpoint_every=100')


def records(workdir):
  return [{k: r[k] for k in COMPARED if k in r} for r in metrics.read_metrics(str(workdir))]


def test_sigterm_then_rerun_ends_with_the_metrics_of_an_uninterrupted_run(tmp_path, env, data_dir):
  """An invariant is the only reference here: preempted and resumed equals uninterrupted."""
  whole = run(command(tmp_path / 'whole', data_dir, *LONG), env)
  assert whole.returncode == 0, whole.stderr[-3000:]

  args = command(tmp_path / 'cut', data_dir, *LONG)
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics_file = tmp_path / 'cut' / 'metrics.jsonl'
  deadline = time.time() + 120
  while not (metrics_file.exists() and metrics_file.read_text()) and time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 75, stderr[-3000:]
  assert 'stopped by SIGTERM after step' in stderr and 'Traceback' not in stderr
  stopped_at = max(int(s) for s in os.listdir(tmp_path / 'cut' / 'checkpoints'))
  assert 10 <= stopped_at < 300

  again = run(args, env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert records(tmp_path / 'cut') == records(tmp_path / 'whole')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, env, data_dir):
  workdir = tmp_path_factory.mktemp('trained')
  done = run(command(workdir, data_dir), env)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def _corrupt_copy(trained, tmp_path):
  workdir = tmp_path / 'corrupt'
  shutil.copytree(trained, workdir)
  latest = max(os.listdir(workdir / 'checkpoints'), key=int)
  for name in os.listdir(workdir / 'checkpoints' / latest / 'state' / 'd'):
    (workdir / 'checkpoints' / latest / 'state' / 'd' / name).write_bytes(b'garbage')
  return workdir, f'checkpoints/{latest} is corrupt'


def test_bad_inputs_exit_1_with_one_clear_line(tmp_path, env, data_dir, trained):
  (tmp_path / 'a_file').write_text('')
  corrupt, corrupt_message = _corrupt_copy(trained, tmp_path)
  w = tmp_path / 'w'
  cases = {
      'unknown corpus': (command(w, data_dir, '--config.data.corpus=nope'), r"data.corpus='nope'"),
      'unknown tokenizer': (command(w, data_dir, '--config.data.tokenizer=words'),
                            "data.tokenizer='words'"),
      'mesh vs devices': (command(w, data_dir, '--config.mesh.shape=(2,1,1)'),
                          'mesh.shape=(2, 1, 1) is invalid: uses 2 devices but 1 are available'),
      'batch vs data parallel': (
          command(w, data_dir, '--config.train.batch_size=6', '--config.mesh.shape=(4,1,1)'),
          'train.batch_size=6 is invalid: must be divisible by the data-parallel size 4'),
      'length the encoding cannot serve': (
          command(w, data_dir, '--config.model.pos=learned', '--config.model.max_len=16'),
          'train.seq_len=32 is invalid: model.pos=learned has a table of model.max_len=16'),
      'unwritable workdir': (command(tmp_path / 'a_file' / 'sub', data_dir),
                             'cannot write to --workdir='),
      'corrupt checkpoint': (command(corrupt, data_dir), corrupt_message),
      'override of a missing field': (command(w, data_dir, '--config.train.stpes=5'),
                                      'config field train.stpes does not exist'),
      'unknown preset': ([sys.executable, 'run.py', '--config=configs/lm.py:huge', f'--workdir={w}'],
                         "unknown preset 'huge'"),
  }
  four = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs = {name: subprocess.Popen(args, cwd=REPO, env=four if 'batch' in name else env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    _, stderr = proc.communicate(timeout=180)
    lines = [l for l in stderr.splitlines() if l.startswith('run.py:')]
    assert proc.returncode == 1, (name, stderr[-3000:])
    assert len(lines) == 1 and cases[name][1] in lines[0], (name, stderr[-3000:])
    assert 'Traceback' not in stderr, (name, stderr[-3000:])
  assert not w.exists()   # nothing was created for runs that could not start
  assert (corrupt / 'metrics.jsonl').read_text() == (trained / 'metrics.jsonl').read_text()


# ----------------------------------------------------------------------------------------------
# --mode=generate


def generate(workdir, *flags):
  return [sys.executable, 'run.py', '--mode=generate', f'--workdir={workdir}', *flags]


def test_generate_prints_only_the_continuation_and_stops_before_a_stop_string(trained, env):
  from lcr.decode import text
  flags = ['--prompt=In the beginning', '--config.decode.max_new_tokens=40',
           '--config.decode.strategy=sample', '--config.decode.seed=1']
  overrides = [f[len('--config.'):] for f in flags[1:]]
  want = text.generate_text(str(trained), overrides, 'In the beginning', out=None)[0]
  done = run(generate(trained, *flags), env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout == want + '\n' and len(want) > 0
  at = next(i for i in range(2, len(want) - 1) if want[i:i + 2].isascii() and want[i:i + 2].isalpha())
  stop = want[at:at + 2]
  cut = run(generate(trained, *flags, f'--config.decode.stop={stop}'), env)
  assert cut.returncode == 0, cut.stderr[-3000:]
  assert cut.stdout == want[:want.index(stop)] + '\n'
  beams = run(generate(trained, '--prompt=In the beginning', '--config.decode.strategy=beam',
                       '--config.decode.num_beams=3', '--config.decode.max_new_tokens=8'), env)
  assert beams.returncode == 0 and beams.stdout.strip('\n'), beams.stderr[-3000:]
  assert beams.stderr.count('] beam ') == 3


def test_generate_bad_inputs_exit_1_with_one_clear_line(tmp_path, env, data_dir, trained):
  learned = tmp_path / 'learned'
  done = run(command(learned, data_dir, '--config.model.pos=learned', '--config.model.max_len=40'), env)
  assert done.returncode == 0, done.stderr[-3000:]
  (tmp_path / 'empty').mkdir()
  cases = {
      'empty prompt': (generate(trained, '--prompt='), '--prompt is empty'),
      'learned table too short': (
          generate(learned, '--prompt=In the beginning', '--config.decode.max_new_tokens=30'),
          'decode.max_new_tokens=30 is invalid'),
      'unknown strategy': (generate(trained, '--prompt=a', '--config.decode.strategy=nucleus'),
                           "decode.strategy='nucleus'"),
      'top_p outside (0, 1]': (generate(trained, '--prompt=a', '--config.decode.top_p=1.5'),
                               'decode.top_p=1.5 is invalid'),
      'no beams': (generate(trained, '--prompt=a', '--config.decode.num_beams=0'),
                   'decode.num_beams=0 is invalid'),
      'workdir without a checkpoint': (generate(tmp_path / 'empty', '--prompt=a'),
                                       'has no trained model'),
      'no prompt': (generate(trained), 'needs exactly one of --prompt'),
  }
  procs = {name: subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=180)
    lines = [l for l in stderr.splitlines() if l.startswith('run.py:')]
    assert proc.returncode == 1, (name, stderr[-3000:])
    assert len(lines) == 1 and cases[name][1] in lines[0], (name, stderr[-3000:])
    assert 'Traceback' not in stderr and not stdout.strip(), (name, stderr[-3000:])
