"""Corpora by name: random-access sequences of document texts, one per split.

``data.corpus`` is a built-in name (``bible``, ``pystdlib``: built locally by :mod:`lcr.data.builders`
the first time they are asked for) or ``tfds:<name>`` for a TensorFlow Datasets dataset that was
prepared beforehand in the ``array_record`` format. Both are read with tfds data sources, which need no
TensorFlow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from lcr.data.config import DataConfig

TFDS_PREFIX = 'tfds:'


class CorpusUnavailableError(RuntimeError):
  """A corpus cannot be read; the message says how to make it available."""


class TextSource(Sequence[str]):
  """Document texts of one split of a corpus: ``len(source)`` and ``source[i] -> str``."""

  def __init__(self, records: Sequence[Any], text_key: str, description: str):
    self._records = records
    self._text_key = text_key
    self.description = description

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> str:  # type: ignore[override]
    return self._text_of(self._records[index])

  def record(self, index: int) -> Any:
    """The whole record of document ``index`` (all its features, e.g. the built-in corpora's 'id')."""
    return self._records[index]

  def _text_of(self, record: Any) -> str:
    try:
      text = record[self._text_key]
    except KeyError as e:
      raise CorpusUnavailableError(
          f'{self.description} has no feature {self._text_key!r} (data.text_key); its features are '
          f'{sorted(record)}') from e
    if hasattr(text, 'item') and getattr(text, 'shape', None) == ():
      text = text.item()
    return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)


def iter_texts(source: TextSource) -> Iterator[str]:
  """Every document text of ``source`` in order (one read per record: batched reads are no faster)."""
  for index in range(len(source)):
    yield source[index]


def _builtin_split(corpus: str, data_cfg: DataConfig, split: str) -> TextSource:
  from lcr.data import builders  # pylint: disable=import-outside-toplevel
  from lcr.data.config import resolve_data_dir  # pylint: disable=import-outside-toplevel
  data_dir = resolve_data_dir(data_cfg)
  start = time.perf_counter()
  try:
    builder = builders.prepare(corpus, str(data_dir))
  except builders.SourceMissingError as e:
    raise CorpusUnavailableError(str(e)) from e
  logging.info('corpus %s ready in %s (%.1f s)', corpus, builder.data_dir, time.perf_counter() - start)
  try:
    records = builder.as_data_source(split)
  except ValueError as e:
    raise CorpusUnavailableError(
        f'corpus {corpus!r} has no split {split!r}; its splits are {sorted(builder.info.splits)}') from e
  return TextSource(records, 'text', f'corpus {corpus!r} split {split!r}')


def _tfds_split(data_cfg: DataConfig, split: str) -> TextSource:
  """Opens ``split`` of an already prepared tfds dataset; never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from lcr.data.config import resolve_data_dir  # pylint: disable=import-outside-toplevel
  name = data_cfg.corpus[len(TFDS_PREFIX):]
  data_dir = resolve_data_dir(data_cfg)
  try:
    records = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
  except (ValueError, NotImplementedError, AssertionError, FileNotFoundError) as e:
    # tfds reports an unprepared dataset as NotImplementedError (no random access to tfrecord), an
    # unknown name as DatasetNotFoundError and an unknown split as ValueError.
    raise CorpusUnavailableError(
        f'cannot read split {split!r} of tfds dataset {name!r} from data_dir {data_dir}: {e}\n'
        f'Prepare it once, in the array_record format that random access needs (downloads the data):\n'
        f'  tfds build {name} --data_dir={data_dir} --file_format=array_record\n'
        f'and set data.text_key to its text feature (now {data_cfg.text_key!r}).') from e
  return TextSource(records, data_cfg.text_key, f'tfds dataset {name!r} split {split!r}')


# Built-in corpora: name -> opener of one split. tfds corpora are the 'tfds:' prefix, not entries.
BUILTIN_CORPORA: dict[str, Callable[[DataConfig, str], TextSource]] = {
    'bible': lambda data_cfg, split: _builtin_split('bible', data_cfg, split),
    'pystdlib': lambda data_cfg, split: _builtin_split('pystdlib', data_cfg, split),
}


def open_split(data_cfg: DataConfig, split: str) -> TextSource:
  """The document texts of ``split`` of ``data.corpus`` (building a built-in corpus on first use)."""
  if data_cfg.corpus.startswith(TFDS_PREFIX):
    return _tfds_split(data_cfg, split)
  return BUILTIN_CORPORA[data_cfg.corpus](data_cfg, split)
