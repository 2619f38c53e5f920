"""Train, evaluate or generate from one config.

    python run.py --config=configs/lm.py:smoke --workdir=/tmp/lcr_smoke [--mode=train|eval|train_and_eval]
    python run.py --config=configs/lm.py:cpu --config.model.pos=alibi --config.train.steps=500 ...
    python run.py --mode=generate --workdir=/tmp/lcr_smoke --prompt="In the beginning"
        [--config.decode.strategy=sample --config.decode.top_p=0.9 --config.decode.max_new_tokens=200]

``--mode=generate`` takes the model, tokenizer and config from the workdir (no --config needed;
overrides still apply) and prints only the continuation on stdout, streamed; logs go to stderr.

Several hosts: on a Cloud TPU VM every host runs the same command and JAX finds its peers; elsewhere
pass --coordinator_address=HOST:PORT (of process 0) --num_processes=N --process_id=I on each.

Exit status: 0 done; 1 a user error (one line on stderr: bad config, missing data, corrupt
checkpoint, unwritable workdir, diverged loss); 75 stopped by SIGTERM after saving a checkpoint
(run the same command again to resume).
"""

from absl import app, flags, logging

from lcr import cli

_CONFIG = flags.DEFINE_string('config', None, 'config file[:preset], e.g. configs/lm.py:cpu; '
                              '--config.a.b=value overrides any field')
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints, metrics and config.json')
_MODE = flags.DEFINE_enum('mode', 'train_and_eval', ['train', 'eval', 'train_and_eval', 'generate'],
                          'train (with validation loss at the training length), evaluate a trained '
                          'workdir at eval.lengths, both, or generate text from a trained workdir')
_PROMPT = flags.DEFINE_string('prompt', None, '--mode=generate: the text to continue')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, '--mode=generate: a file whose text to continue')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0 for multi-process runs off TPU VMs')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes (hosts)')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'index of this process, 0-based')

_overrides: list[str] = []


def _prompt() -> str:
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    cli.exit_with('run.py', '--mode=generate needs exactly one of --prompt=TEXT and --prompt_file=FILE')
  if _PROMPT_FILE.value is None:
    return _PROMPT.value
  try:
    with open(_PROMPT_FILE.value, encoding='utf-8') as f:
      return f.read()
  except OSError as err:
    cli.exit_with('run.py', f'--prompt_file={_PROMPT_FILE.value}: {err.strerror or err}')


def main(argv: list[str]) -> None:
  generate = _MODE.value == 'generate'
  cli.start('run.py', argv, config=_CONFIG.value, workdir=_WORKDIR.value, config_help='FILE[:PRESET]',
            config_required=not generate)
  # Imported after flag parsing: everything below may touch JAX, which multi-host start-up precedes.
  from lcr import eval_workdir, sharding, train
  with cli.one_line_errors('run.py'):
    if generate:
      from lcr.decode import text
      text.generate_text(_WORKDIR.value, _overrides, _prompt())
      print(flush=True)
      return
    config = cli.load(_CONFIG.value, _overrides)
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _MODE.value in ('train', 'train_and_eval'):
      final = train.train_and_evaluate(config, _WORKDIR.value)
      logging.info('final: %s', final)
    if _MODE.value in ('eval', 'train_and_eval'):
      eval_workdir.evaluate_workdir(_WORKDIR.value, config.eval)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('run.py', _overrides))
