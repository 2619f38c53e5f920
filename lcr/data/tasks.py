"""Synthetic retrieval tasks as data sources: MQAR and passkey, trained with loss on the answers only.

A task makes an :class:`Example` of any length with its needle at a chosen *depth*: a token row,
the target predicted after each token, and a mask marking the answers among the targets. Training
rows put their weight on the answers alone, so a small model learns the retrieval itself rather
than the filler around it; evaluation (``lcr.retrieval``) asks for the same answers at longer
lengths and every depth. Depth is the fraction of the filler that comes before the needle: 0 puts
the needle first, farthest from the question, 1 right before it.

* ``mqar``: multi-query associative recall (Arora et al. 2023, "Zoology", §3.1): ``pairs`` keys,
  each followed by its value, then ``queries`` keys (each key at least once, the rest drawn at
  random, in random order); the answer to a query is the value that followed its key, predicted
  at the query. As in Zoology's generator the values are never shown after the pairs (a query is
  followed by the next query, not by its answer), so they cannot be guessed by elimination; keys
  and values are drawn without repeats. Keys, values and filler come from three disjoint alphabets
  of ``alphabet`` ids each (id 0 is padding). Zoology scatters its queries through the rest of the
  sequence with power-law gaps; here filler sits between the pairs and the queries, so the distance
  from a value to its queries is set by the length and the depth, as in passkey. Layout of an
  n-token example, Q queries, f filler: ``f[:cut] k1 v1 … kP vP f[cut:] q1 … qQ f``,
  cut = round(depth · (n − 2P − Q − 1)).
* ``passkey``: the prompt of :mod:`lcr.passkey` in the tokenizer's ids, its filler starting at a
  random point of the filler text; the answer is the key.

Training rows come from a grain pipeline over row indices: row i of seed s is generated from
``np.random.default_rng([s, stream, i])``, one example of a random length between the task's
minimum and T + 1 (then padding) at a random depth, so no one layout can be learnt by heart. The
iterator's state is one index: it checkpoints and resumes exactly, and any number of processes read
disjoint rows of the same global sequence. Validation rows use another stream of the same seed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol

import grain
import numpy as np

from lcr import passkey
from lcr.config import fail
from lcr.data.config import DataConfig
from lcr.data.pipeline import _check_sharding as check_sharding
from lcr.data.tokenizers import get_tokenizer

TRAIN_STREAM, VALIDATION_STREAM, EVAL_STREAM = 0, 1, 2
NUM_ROWS = 2 ** 40   # row indices of the (practically endless) training sequence


@dataclasses.dataclass(frozen=True)
class Example:
  """One retrieval example: tokens [n], the n − 1 targets predicted at tokens 0 … n − 2 (the next
  token, except where an answer is asked for without being shown), and which targets are answers."""
  tokens: np.ndarray     # [n] int32
  targets: np.ndarray    # [n − 1] int32
  answers: np.ndarray    # [n − 1] bool
  depth: float


class Task(Protocol):
  """A retrieval task: ``example(rng, length, depth)`` makes an Example of exactly ``length`` tokens."""
  name: str

  @property
  def vocab_size(self) -> int: ...

  @property
  def min_length(self) -> int: ...

  def example(self, rng: np.random.Generator, length: int, depth: float) -> Example: ...


def _check(task: Task, length: int, depth: float) -> None:
  if length < task.min_length:
    raise ValueError(f'a {task.name} example needs at least {task.min_length} tokens, asked for '
                     f'{length}')
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f'depth must be in [0, 1], got {depth}')


@dataclasses.dataclass(frozen=True)
class Mqar:
  """Multi-query associative recall (module docstring): ``pairs`` pairs, ``queries`` queries
  (0 = one per key) and alphabets of ``alphabet`` ids."""
  pairs: int = 8
  alphabet: int = 64
  queries: int = 0
  name: ClassVar[str] = 'mqar'

  @property
  def key_start(self) -> int:
    return 1

  @property
  def value_start(self) -> int:
    return 1 + self.alphabet

  @property
  def filler_start(self) -> int:
    return 1 + 2 * self.alphabet

  @property
  def vocab_size(self) -> int:
    return 1 + 3 * self.alphabet

  @property
  def num_queries(self) -> int:
    return self.queries or self.pairs

  @property
  def min_length(self) -> int:
    return 2 * self.pairs + self.num_queries + 1

  def example(self, rng: np.random.Generator, length: int, depth: float) -> Example:
    _check(self, length, depth)
    p, q = self.pairs, self.num_queries
    keys = rng.choice(self.alphabet, p, replace=False) + self.key_start
    values = rng.choice(self.alphabet, p, replace=False) + self.value_start
    # Every key is queried once, then random keys up to q queries, in random order.
    asked = rng.permutation(np.concatenate([np.arange(p), rng.integers(0, p, max(q - p, 0))])[:q])
    n_fill = length - self.min_length
    filler = rng.integers(0, self.alphabet, n_fill + 1) + self.filler_start
    cut = int(round(depth * n_fill))
    pairs = np.stack([keys, values], axis=1).reshape(-1)
    tokens = np.concatenate([filler[:cut], pairs, filler[cut:n_fill], keys[asked],
                             filler[n_fill:]]).astype(np.int32)
    targets = tokens[1:].copy()
    answer_at = np.arange(length - 1 - q, length - 1)    # target j is predicted at token j
    targets[answer_at] = values[asked]
    return Example(tokens, targets, np.isin(np.arange(length - 1), answer_at), float(depth))


@dataclasses.dataclass(frozen=True)
class Passkey:
  """Passkey retrieval (lcr.passkey's prompt in ``fmt``), answers = the key's tokens."""
  tokenizer: Any
  fmt: str = 'compact'
  bos_id: int | None = None
  name: ClassVar[str] = 'passkey'

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def min_length(self) -> int:
    f = passkey.FORMATS[self.fmt]
    texts = (f.intro, f.needle.format(key=99_999), f.question, '99999')
    return sum(len(self.tokenizer.encode(t)) for t in texts) + (self.bos_id is not None)

  def example(self, rng: np.random.Generator, length: int, depth: float) -> Example:
    """The filler starts at a random point of its text, so that short rows show all of it: from
    its start, 20 filler tokens would only ever show the first sentence."""
    _check(self, length, depth)
    key, offset = int(rng.integers(10_000, 100_000)), int(rng.integers(0, 1 << 16))
    ex = passkey.make_example(self.tokenizer, length, float(depth), key, self.fmt, self.bos_id,
                              filler_offset=offset)
    return Example(ex.tokens, ex.tokens[1:], np.arange(1, length) >= ex.answer_start, float(depth))


def _passkey(data_cfg: DataConfig) -> Passkey:
  tokenizer = get_tokenizer(data_cfg)
  return Passkey(tokenizer, data_cfg.passkey_format, tokenizer.bos_id)


# data.task → the task it names ('lm', language modelling on the corpus, is not a task here).
TASKS: dict[str, Callable[[DataConfig], Task]] = {
    'mqar': lambda c: Mqar(c.mqar_pairs, c.mqar_vocab, c.mqar_queries),
    'passkey': _passkey,
}


def get_task(data_cfg: DataConfig) -> Task:
  """The retrieval task that ``data.task`` names."""
  if data_cfg.task not in TASKS:
    fail('data.task', data_cfg.task, f'is not a retrieval task; tasks are {sorted(TASKS)}')
  return TASKS[data_cfg.task](data_cfg)


# ----------------------------------------------------------------------------------------------
# Training rows and batches.


def training_row(example: Example, seq_len: int) -> dict[str, np.ndarray]:
  """A [T] training row holding one example of at most T + 1 tokens, then padding (token 0,
  segment 0); weight 1 on the example's answers only."""
  n = len(example.tokens)
  if n > seq_len + 1:
    raise ValueError(f'an example of {n} tokens does not fit a row of {seq_len} + 1')
  inputs, targets = np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32)
  inputs[:n - 1], targets[:n - 1] = example.tokens[:-1], example.targets
  weights = np.zeros(seq_len, np.float32)
  weights[:n - 1] = example.answers
  return {'inputs': inputs, 'targets': targets, 'positions': np.arange(seq_len, dtype=np.int32),
          'segment_ids': (np.arange(seq_len) < n - 1).astype(np.int32), 'weights': weights}


def row(task: Task, seed: int, stream: int, seq_len: int, index: int) -> dict[str, np.ndarray]:
  """Row ``index`` of the ``stream`` of ``seed``: an example of a uniformly random length in
  [task.min_length, T + 1] (so no one layout is learnt by heart) at a uniformly random depth."""
  rng = np.random.default_rng([seed, stream, int(index)])
  length = int(rng.integers(task.min_length, seq_len + 2))
  return training_row(task.example(rng, length, float(rng.random())), seq_len)


def check_length(task: Task, seq_len: int) -> None:
  if seq_len + 1 < task.min_length:
    fail('train.seq_len', seq_len, f'a {task.name} training row holds train.seq_len + 1 tokens and '
         f'the task needs at least {task.min_length}')


def make_task_dataset(task: Task, *, seq_len: int, batch_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1,
                      stream: int = TRAIN_STREAM) -> grain.IterDataset:
  """Endless batches of this process's rows (rows p, p + P, … of the global sequence)."""
  check_length(task, seq_len)
  local_batch = check_sharding(batch_size, process_index, process_count)
  rows = grain.MapDataset.range(NUM_ROWS)[process_index::process_count]
  rows = rows.map(functools.partial(row, task, seed, stream, seq_len))
  return rows.batch(local_batch, drop_remainder=True).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def validation_batches(task: Task, *, seq_len: int, batch_size: int, seed: int, num_batches: int,
                       process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The same ``num_batches`` held-out batches every time (another stream of the same seed)."""
  iterator = iter(make_task_dataset(task, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                    process_index=process_index, process_count=process_count,
                                    stream=VALIDATION_STREAM))
  return [next(iterator) for _ in range(num_batches)]


def eval_examples(task: Task, length: int, depths: Iterable[float], trials: int,
                  seed: int = 0) -> list[Example]:
  """``trials`` examples per depth (depth-major); the same seed gives every model the same ones."""
  out = []
  for i, depth in enumerate(depths):
    rng = np.random.default_rng([seed, EVAL_STREAM, length, i])
    out += [task.example(rng, length, float(depth)) for _ in range(trials)]
  return out


def stack(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [n, L], targets [n, L − 1], answers [n, L − 1]) of examples of one length."""
  return tuple(np.stack([getattr(e, f) for e in examples]) for f in ('tokens', 'targets', 'answers'))
