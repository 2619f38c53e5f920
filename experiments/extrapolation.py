"""Train short, test long: one model per positional encoding, evaluated far beyond its length.

  python experiments/extrapolation.py --config=configs/extrapolation.py:quick --workdir=runs/quick

writes results.jsonl, per_position.jsonl, passkey.jsonl, extrapolation.png, per_position.png,
passkey.png and summary.md into the workdir. ``--config.a.b=value`` overrides any field, as in
run.py. Re-running resumes (finished models and evaluations are reused); ``--plots_only`` redraws
the figures and table from the result files without touching any model.

Exit status: 0 done; 1 a user error (one line on stderr); 75 stopped by SIGTERM after saving a
checkpoint (run the same command again to resume).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from lcr import cli  # noqa: E402

_CONFIG = flags.DEFINE_string('config', None, 'configs/extrapolation.py:<preset>; --config.a.b=value '
                              'overrides any field')
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory of the study (created if missing)')
_ONLY = flags.DEFINE_string('only', None, 'train and evaluate only this variant (no plots)')
_PLOTS_ONLY = flags.DEFINE_bool('plots_only', False, 'only redraw the plots and summary.md')

_overrides: list[str] = []


def main(argv: list[str]) -> None:
  cli.start('extrapolation.py', argv, config=_CONFIG.value, workdir=_WORKDIR.value,
            config_help='configs/extrapolation.py:PRESET')
  from lcr import sharding, study
  worker_argv = [sys.executable, os.path.abspath(__file__)] + [
      a for a in sys.argv[1:] if not a.startswith(('--only', '--plots_only', '--noplots_only'))]
  with cli.one_line_errors('extrapolation.py', study.StudyError):
    config = cli.load_config_dict(_CONFIG.value)
    for override in _overrides:
      cli.apply_override(config, override)
    sharding.initialize_distributed()   # several TPU VM workers: one JAX process each
    written = study.run_study(config, _WORKDIR.value, worker_argv=worker_argv, only=_ONLY.value,
                              plots_only=_PLOTS_ONLY.value)
  for name in sorted(written):
    logging.info('wrote %s', written[name])
  if 'summary.md' in written:
    with open(written['summary.md']) as f:
      print(f.read())


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('extrapolation.py', _overrides))
