"""Deterministic generated tasks, split by length: copy, reverse, sort, addition, rewrite.

An example is a pair of symbol lists (source, target) over one shared vocabulary (:data:`VOCAB`).
Its *length* n is the number of source symbols (for addition: digits per operand). Example i of a
split is a function of (task.seed, split, length, i) alone, so any process regenerates the same
data in any order. Training draws n uniformly from min_len … N; test sets hold
``task.test_examples`` examples at each test length N·m. At a test length ≤ N, a source is
test-only when crc32(source) mod ``task.holdout`` = 0, and training never draws it, so train and
test examples are disjoint at every length.

  copy      abc → abc
  reverse   abc → cba
  sort      cab → abc
  addition  n-digit a + n-digit b → a + b (most significant digit first), e.g. 58+67 → 125
  rewrite   every letter becomes one or two letters by a fixed table (:data:`REWRITE_TABLE`):
            a monotonic transduction with insertions, as in grapheme-to-phoneme or TTS alignment
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from collections.abc import Callable

import numpy as np

from lcr.seq2seq.config import TASKS, TaskConfig

PAD, BOS, EOS, SEP = '<pad>', '<s>', '</s>', '<sep>'
SPECIALS = (PAD, BOS, EOS, SEP)
VOCAB: tuple[str, ...] = SPECIALS + tuple(string.digits) + ('+',) + tuple(string.ascii_lowercase)
ID = {s: i for i, s in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, SEP_ID = (ID[s] for s in SPECIALS)
VOCAB_SIZE = len(VOCAB)
SPLIT_IDS = {'train': 0, 'test': 1}


def _rewrite_table() -> dict[str, str]:
  """Letter → one or two letters: a fixed permutation, and a second letter for half of them.

  Built from a fixed seed (it is part of the task's definition, not of a run).
  """
  rng = np.random.default_rng(20170314)
  letters = list(string.ascii_lowercase)
  image = rng.permutation(letters)
  extra = rng.permutation(letters)
  return {a: image[i] + (extra[i] if i % 2 == 0 else '') for i, a in enumerate(letters)}


REWRITE_TABLE = _rewrite_table()


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  source: Callable[[np.random.Generator, int, TaskConfig], list[str]]
  target: Callable[[list[str]], list[str]]
  max_source: Callable[[int], int]     # the most source symbols at length n
  max_target: Callable[[int], int]     # the most target symbols at length n


def _letters(rng: np.random.Generator, n: int, cfg: TaskConfig) -> list[str]:
  return [string.ascii_lowercase[i] for i in rng.integers(0, cfg.symbols, n)]


def _operands(rng: np.random.Generator, n: int, cfg: TaskConfig) -> list[str]:
  """Two n-digit numbers (no leading zero unless n = 1) around a '+'."""
  def number():
    digits = rng.integers(0, 10, n)
    if n > 1:
      digits[0] = rng.integers(1, 10)
    return [str(d) for d in digits]
  return number() + ['+'] + number()


def _sum(source: list[str]) -> list[str]:
  plus = source.index('+')
  return list(str(int(''.join(source[:plus])) + int(''.join(source[plus + 1:]))))


REGISTRY: dict[str, Task] = {t.name: t for t in (
    Task('copy', _letters, list, lambda n: n, lambda n: n),
    Task('reverse', _letters, lambda s: s[::-1], lambda n: n, lambda n: n),
    Task('sort', _letters, sorted, lambda n: n, lambda n: n),
    Task('addition', _operands, _sum, lambda n: 2 * n + 1, lambda n: n + 1),
    Task('rewrite', _letters, lambda s: [c for a in s for c in REWRITE_TABLE[a]],
         lambda n: n, lambda n: 2 * n),
)}
assert tuple(REGISTRY) == TASKS


def encode(symbols: list[str]) -> np.ndarray:
  return np.asarray([ID[s] for s in symbols], np.int32)


def decode(ids) -> list[str]:
  """Symbols of ``ids`` up to the first EOS (specials other than EOS are kept, as names)."""
  out = []
  for i in np.asarray(ids).tolist():
    if i == EOS_ID:
      break
    out.append(VOCAB[i])
  return out


def is_test_only(source: list[str], holdout: int) -> bool:
  return zlib.crc32(' '.join(source).encode()) % holdout == 0


def _rng(cfg: TaskConfig, split: str, length: int, index: int) -> np.random.Generator:
  return np.random.default_rng([cfg.seed, SPLIT_IDS[split], length, index])


def train_example(cfg: TaskConfig, index: int) -> tuple[list[str], list[str]]:
  """Training example ``index``: its length drawn from min_len … N, never a test-only source."""
  task = REGISTRY[cfg.name]
  rng = _rng(cfg, 'train', 0, index)
  test_lengths = set(cfg.test_lengths)
  while True:
    n = int(rng.integers(cfg.min_len, cfg.train_len + 1))
    source = task.source(rng, n, cfg)
    if n not in test_lengths or not is_test_only(source, cfg.holdout):
      return source, task.target(source)


def test_example(cfg: TaskConfig, length: int, index: int) -> tuple[list[str], list[str]]:
  """Test example ``index`` at ``length``; at lengths ≤ N only test-only sources qualify."""
  task = REGISTRY[cfg.name]
  rng = _rng(cfg, 'test', length, index)
  while True:
    source = task.source(rng, length, cfg)
    if length > cfg.train_len or is_test_only(source, cfg.holdout):
      return source, task.target(source)


def test_set(cfg: TaskConfig, length: int) -> list[tuple[list[str], list[str]]]:
  return [test_example(cfg, length, i) for i in range(cfg.test_examples)]


def row_positions(config, length: int) -> int:
  """Positions the model needs to serve an example of ``length`` (decoder-only: the whole
  source, separator, target and EOS; encoder-decoder: the longer of source and target + BOS)."""
  task = REGISTRY[config.seq2seq.task.name]
  if config.model.arch == 'decoder':
    return task.max_source(length) + task.max_target(length) + 2
  return max(task.max_source(length), task.max_target(length) + 1)
