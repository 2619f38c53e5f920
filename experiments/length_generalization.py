"""Seq2seq length generalisation: train on lengths ≤ N, test at N … 8N, one model per tip.

  python experiments/length_generalization.py --config=configs/length_generalization.py:quick --workdir=runs/lengths

writes results.jsonl, length_generalization.png and summary.md into the workdir.
``--config.a.b=value`` overrides any field, as in run.py. Re-running resumes (finished models and
rows are reused, an interrupted training continues from its last checkpoint); ``--plots_only``
redraws the figure and table from results.jsonl without touching any model.

Exit status: 0 done; 1 a user error (one line on stderr).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from lcr import cli  # noqa: E402

_CONFIG = flags.DEFINE_string('config', None, 'configs/length_generalization.py:<preset>; '
                              '--config.a.b=value overrides any field')
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory of the study (created if missing)')
_ONLY = flags.DEFINE_string('only', None, 'train and evaluate only this variant (no plots)')
_PLOTS_ONLY = flags.DEFINE_bool('plots_only', False, 'only redraw the figure and summary.md')

_overrides: list[str] = []


def main(argv: list[str]) -> None:
  cli.start('length_generalization.py', argv, config=_CONFIG.value, workdir=_WORKDIR.value,
            config_help='configs/length_generalization.py:PRESET')
  from lcr import sharding, study as lm_study
  from lcr.seq2seq import study
  worker_argv = [sys.executable, os.path.abspath(__file__)] + [
      a for a in sys.argv[1:] if not a.startswith(('--only', '--plots_only', '--noplots_only'))]
  with cli.one_line_errors('length_generalization.py', lm_study.StudyError):
    config = cli.load_config_dict(_CONFIG.value)
    for override in _overrides:
      cli.apply_override(config, override)
    sharding.initialize_distributed()
    written = study.run_study(config, _WORKDIR.value, worker_argv=worker_argv, only=_ONLY.value,
                              plots_only=_PLOTS_ONLY.value)
  for name in sorted(written):
    logging.info('wrote %s', written[name])
  if 'summary.md' in written:
    with open(written['summary.md']) as f:
      print(f.read())


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('length_generalization.py', _overrides))
