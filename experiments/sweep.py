"""Expands a config's sweep into runs and runs them here, one after another, or on a TPU VM.

The config file's ``EXPERIMENT`` names the script each run executes (default
experiments/extrapolation.py; configs/length_generalization.py runs
experiments/length_generalization.py).

  python experiments/sweep.py --config=configs/extrapolation.py:quick --workdir=runs/sweep
  python experiments/sweep.py --config=configs/extrapolation.py:paper --workdir=/data/sweep \\
      --launcher=tpu_vm --tpu=my-v4-32 --zone=us-central2-b --repo_dir=~/lcr --dry_run

``get_sweep(arg)`` of the config file lists each run's overrides (positional encodings × seeds ×
training lengths, say). Every run is ``experiments/extrapolation.py`` with its own workdir
``<workdir>/<run name>``; afterwards the results of all runs are drawn together into ``<workdir>``
(seeds of one variant become a mean line with a band and mean ± std in summary.md).
``--dry_run`` prints the exact commands instead of running them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags, logging  # noqa: E402

_CONFIG = flags.DEFINE_string('config', None, 'Config file and preset, e.g. configs/extrapolation.py:quick.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Parent directory of the runs; combined plots go here.')
_LAUNCHER = flags.DEFINE_enum('launcher', 'local', ['local', 'tpu_vm'], 'Where the runs execute.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands, run nothing.')
_COMBINE_ONLY = flags.DEFINE_bool('combine_only', False, 'Only draw the combined plots and table.')
_SET = flags.DEFINE_multi_string('set', [], 'An override added to every run, e.g. train.steps=2000.')
_TPU = flags.DEFINE_string('tpu', None, 'TPU VM name (tpu_vm launcher).')
_ZONE = flags.DEFINE_string('zone', None, 'TPU VM zone (tpu_vm launcher).')
_PROJECT = flags.DEFINE_string('project', None, 'Google Cloud project (tpu_vm; default: gcloud\'s).')
_REPO_DIR = flags.DEFINE_string('repo_dir', '~/lcr', 'The lcr checkout on every TPU VM worker.')
_PYTHON = flags.DEFINE_string('python', 'python3', 'Python on the TPU VM workers.')
flags.mark_flags_as_required(['config', 'workdir'])


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict


def _format(value) -> str:
  if isinstance(value, (tuple, list)):
    return '+'.join(map(str, value))
  return str(value)


def run_name(overrides: dict) -> str:
  """A directory name from a run's overrides: {'study.variants': 'alibi', 'seed': 1} → variants_alibi-seed_1."""
  parts = [f'{key.split(".")[-1]}_{_format(v)}' for key, v in overrides.items()]
  return re.sub(r'[^A-Za-z0-9_.+-]', '_', '-'.join(parts)) or 'run'


# The experiment a config file runs (its EXPERIMENT, default extrapolation) → what draws the runs
# together.
COMBINERS = {'experiments/extrapolation.py': ('lcr.plots', 'draw_all'),
             'experiments/length_generalization.py': ('lcr.seq2seq.report', 'draw_all')}


def _config_module(config_spec: str):
  path = config_spec.partition(':')[0]
  spec = importlib.util.spec_from_file_location('sweep_config', os.path.join(REPO, path)
                                                if not os.path.isabs(path) else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def experiment(config_spec: str) -> str:
  """The experiment script a config file belongs to (its ``EXPERIMENT``)."""
  return getattr(_config_module(config_spec), 'EXPERIMENT', 'experiments/extrapolation.py')


def expand(config_spec: str) -> list[Run]:
  """The runs of ``get_sweep(arg)`` in the config file ``path:arg``, with distinct names."""
  path, _, arg = config_spec.partition(':')
  module = _config_module(config_spec)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path} has no get_sweep(arg) function')
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  runs = [Run(run_name(o), dict(o)) for o in sweep]
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'runs of {config_spec} share workdir names: {names}')
  return runs


def _override_flag(key: str, value) -> str:
  if isinstance(value, (tuple, list)):   # a Python literal, as lcr.cli parses overrides
    value = repr(tuple(value))
  return f'--config.{key}={value}'


def run_command(config_spec: str, workdir: str, run: Run, extra: list[str], python: str) -> list[str]:
  """The command line of one run (paths relative to the repository root)."""
  return ([python, experiment(config_spec), f'--config={config_spec}',
           f'--workdir={os.path.join(workdir, run.name)}']
          + [_override_flag(k, v) for k, v in run.overrides.items()]
          + [f'--config.{s}' for s in extra])


def combine_command(config_spec: str, workdir: str, python: str) -> list[str]:
  return [python, 'experiments/sweep.py', f'--config={config_spec}', f'--workdir={workdir}',
          '--combine_only']


def tpu_vm_command(command: list[str], *, tpu: str, zone: str, project: str | None,
                   repo_dir: str, worker: str = 'all') -> list[str]:
  """``gcloud compute tpus tpu-vm ssh`` running ``command`` in the checkout on the workers."""
  remote = f'cd {repo_dir} && {shlex.join(command)}'
  return (['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, f'--zone={zone}']
          + ([f'--project={project}'] if project else []) + [f'--worker={worker}', f'--command={remote}'])


def combine(config_spec: str, workdir: str) -> dict[str, str]:
  """Draws every run's results together into ``workdir``."""
  import importlib
  module, function = COMBINERS[experiment(config_spec)]
  dirs = [os.path.join(workdir, r.name) for r in expand(config_spec)]
  return getattr(importlib.import_module(module), function)([d for d in dirs if os.path.isdir(d)],
                                                             workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  spec, workdir = _CONFIG.value, _WORKDIR.value
  if _COMBINE_ONLY.value:
    for name, path in sorted(combine(spec, workdir).items()):
      print(f'wrote {path}')
    return
  runs = expand(spec)
  if _LAUNCHER.value == 'local':
    commands = [run_command(spec, workdir, r, _SET.value, sys.executable if not _DRY_RUN.value
                            else 'python') for r in runs]
    final = None
  else:
    if not _TPU.value or not _ZONE.value:
      raise app.UsageError('--launcher=tpu_vm needs --tpu=NAME and --zone=ZONE')
    where = dict(tpu=_TPU.value, zone=_ZONE.value, project=_PROJECT.value, repo_dir=_REPO_DIR.value)
    commands = [tpu_vm_command(run_command(spec, workdir, r, _SET.value, _PYTHON.value), **where)
                for r in runs]
    final = tpu_vm_command(combine_command(spec, workdir, _PYTHON.value), worker='0', **where)
  for i, command in enumerate(commands):
    if _DRY_RUN.value:
      print(shlex.join(command))
      continue
    logging.info('run %d/%d: %s', i + 1, len(commands), shlex.join(command))
    subprocess.run(command, check=True, cwd=REPO)
  if final is not None:
    if _DRY_RUN.value:
      print(shlex.join(final))
    else:
      subprocess.run(final, check=True, cwd=REPO)
  elif not _DRY_RUN.value:
    for name, path in sorted(combine(spec, workdir).items()):
      print(f'wrote {path}')
  else:
    print(shlex.join(combine_command(spec, workdir, 'python')))


if __name__ == '__main__':
  app.run(main)
