"""Config files and ``--config.a.b=value`` overrides for entry points, with one-line errors.

``load('configs/lm.py:smoke', ['train.steps=5'])`` imports the file, calls ``get_config('smoke')``
(``get_config()`` without a preset), applies the overrides and returns the validated Config. Every
mistake (missing file, unknown preset, a field that does not exist, a value of the wrong type)
is a ConfigError that names it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import logging as std_logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags, logging

from lcr.config import Config, ConfigError, from_config_dict

_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')

EXIT_USER_ERROR = 1
EXIT_PREEMPTED = 75   # EX_TEMPFAIL (sysexits.h): try again later, and the run resumes


def exit_with(program: str, message: str, status: int = EXIT_USER_ERROR) -> typing.NoReturn:
  """Ends an entry point with one line on stderr (``program: message``) and ``status``."""
  print(f'{program}: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def flags_parser(program: str, overrides: list[str]) -> Callable[[list[str]], list[str]]:
  """An absl ``app.run(flags_parser=...)`` that appends ``--config.a.b=v`` overrides to ``overrides``
  (for :func:`load`) and parses the other flags; a bad flag ends the program with one line."""
  def parse(argv: list[str]) -> list[str]:
    try:
      rest, found = split_override_args(argv)
      overrides.extend(found)
      return flags.FLAGS(rest)
    except (flags.Error, ConfigError) as err:
      exit_with(program, f'{err} (see --helpshort)')
  return parse


def start(program: str, argv: Sequence[str], *, config: str | None, workdir: str | None,
          config_help: str, config_required: bool = True) -> None:
  """Checks an entry point's arguments (``--workdir`` and, unless not ``config_required``,
  ``--config`` are required; nothing else positional) and sets up the progress log."""
  if len(argv) > 1:
    exit_with(program, f'unexpected arguments {list(argv[1:])}')
  if not workdir or (config_required and not config):
    exit_with(program, f'--config={config_help} and --workdir=DIR are required')
  std_logging.getLogger('absl').addFilter(QuietLibraries())
  logging.set_verbosity(logging.INFO)


@contextlib.contextmanager
def one_line_errors(program: str, *more: type[Exception]):
  """A user error inside (bad config, missing data, corrupt checkpoint, unwritable workdir,
  diverged loss, and ``more``) ends the program with one line and status 1; SIGTERM, after its
  checkpoint is saved, with status 75. Imports the trainer: enter it after flag parsing."""
  from lcr import checkpoint, train   # pylint: disable=import-outside-toplevel
  from lcr.data import CorpusUnavailableError   # pylint: disable=import-outside-toplevel
  try:
    yield
  except train.Preempted as err:
    exit_with(program, str(err), EXIT_PREEMPTED)
  except (ConfigError, CorpusUnavailableError, checkpoint.CheckpointError, train.WorkdirError,
          train.TrainingError, *more) as err:
    exit_with(program, str(err))


def split_override_args(argv: Sequence[str], flag: str = 'config') -> tuple[list[str], list[str]]:
  """Separates ``--config.a.b=v`` (or ``--config.a.b v``) arguments: (other args, ['a.b=v', ...])."""
  rest, overrides, args = [], [], list(argv)
  prefix = f'--{flag}.'
  while args:
    arg = args.pop(0)
    if arg.startswith(prefix):
      body = arg[len(prefix):]
      if '=' not in body:
        if not args:
          raise ConfigError(f'{arg} needs a value: {arg}=VALUE')
        body = f'{body}={args.pop(0)}'
      overrides.append(body)
    else:
      rest.append(arg)
  return rest, overrides


def load_config_dict(spec: str) -> ml_collections.ConfigDict:
  """``get_config([preset])`` of the file named by ``spec`` = 'path/to/file.py[:preset]'."""
  path, _, preset = spec.partition(':') if not spec.endswith('.py') else (spec, '', '')
  if not os.path.isfile(path):
    raise ConfigError(f'--config={spec}: no such config file {path!r} (e.g. configs/lm.py:smoke)')
  module_spec = importlib.util.spec_from_file_location(
      f'lcr_config_file_{abs(hash(os.path.abspath(path)))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'--config={spec}: {path} defines no get_config()')
  try:
    return module.get_config(preset) if preset else module.get_config()
  except (ValueError, KeyError) as err:
    raise ConfigError(f'--config={spec}: {err}') from err


def apply_override(cd: ml_collections.ConfigDict, override: str) -> None:
  """Sets ``a.b=value`` in ``cd``; the value is parsed to the type the field already has."""
  field, sep, text = override.partition('=')
  if not sep or not field:
    raise ConfigError(f'--config.{override}: expected --config.FIELD=VALUE')
  parts = field.split('.')
  parent = cd
  for i, part in enumerate(parts):
    if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
      where = '.'.join(parts[:i]) or 'the config'
      if not isinstance(parent, ml_collections.ConfigDict):
        raise ConfigError(f'config field {field} does not exist (--config.{override}): {where} is '
                          'a value, not a section')
      raise ConfigError(f'config field {field} does not exist (--config.{override}); fields of '
                        f'{where} are: {", ".join(sorted(parent.keys()))}')
    if i < len(parts) - 1:
      parent = parent[part]
  name = parts[-1]
  value = _parse(field, text, parent[name])
  with parent.unlocked():
    parent[name] = value


def _parse(field: str, text: str, current: Any) -> Any:
  if isinstance(current, str):
    return text
  if isinstance(current, bool):
    if text.lower() in _TRUE + _FALSE:
      return text.lower() in _TRUE
    raise ConfigError(f'config field {field}={text!r} is invalid: expected true or false')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    if isinstance(current, tuple) and all(isinstance(x, str) for x in current):
      return tuple(word.strip() for word in text.split(',') if word.strip())   # a,b → ('a', 'b')
    raise ConfigError(f'config field {field}={text!r} is invalid: expected {_kind(current)}') from None
  if isinstance(current, tuple):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, int) and isinstance(value, float) and value.is_integer():
    return int(value)
  if current is not None and not isinstance(value, type(current)):
    raise ConfigError(f'config field {field}={text!r} is invalid: expected {_kind(current)}')
  return value


def _kind(current: Any) -> str:
  kinds = {int: 'an integer', float: 'a number', tuple: 'a tuple'}
  return f'{kinds.get(type(current), type(current).__name__)}, like {current!r}'


def load(spec: str, overrides: Sequence[str] = ()) -> Config:
  """The validated Config of a config file, preset and overrides."""
  cd = load_config_dict(spec)
  for override in overrides:
    apply_override(cd, override)
  return from_config_dict(cd)


class QuietLibraries(std_logging.Filter):
  """Keeps checkpoint-library chatter out of the progress log (warnings still pass)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname
