"""Training rows cut from a token stream, as random-access sources that grain can shuffle and shard.

A row is a window of ``seq_len + 1`` stream tokens (padded at the end of the stream or document); the
model reads ``inputs = window[:-1]`` and predicts ``targets = window[1:]``. Every row is a dict of
``[seq_len]`` arrays:

* ``inputs``, ``targets`` int32;
* ``segment_ids`` int32: 1, 2, 3, ... for the documents of the row in order, 0 at padding;
* ``positions`` int32: index of each input token within its document's part of this row. Positions
  restart at 0 at every document start *and at the start of every row*, also when the row continues a
  document from the previous row, so training never sees a position >= seq_len ("train short");
* ``weights`` float32: 1 where the target is the next token of the same document, 0 where it is padding
  or the first token (bos) of the next document.

Packed rows (``PackedRows``) advance by ``seq_len`` tokens, so consecutive rows share one token: every
adjacent pair of stream tokens is an (input, target) pair of exactly one row per epoch, and no token is
dropped or duplicated. Unpacked rows (``DocumentRows``) hold one document each, truncated and padded.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from lcr.data.token_cache import TokenStream


def window_example(tokens: np.ndarray, doc_offsets: np.ndarray, start: int, stop: int, seq_len: int,
                   pad_id: int) -> dict[str, np.ndarray]:
  """The training row made of stream tokens [start, stop), stop - start <= seq_len + 1."""
  length = stop - start
  if not 2 <= length <= seq_len + 1:
    raise ValueError(f'a row needs 2..{seq_len + 1} tokens, got [{start}, {stop})')
  window = np.full(seq_len + 1, pad_id, np.int32)
  window[:length] = tokens[start:stop]
  doc = np.full(seq_len + 1, -1, np.int64)  # Document index of each window token, -1 at padding.
  doc[:length] = np.searchsorted(doc_offsets, np.arange(start, stop), side='right') - 1
  input_doc, target_doc = doc[:-1], doc[1:]
  real = input_doc >= 0
  # Documents are contiguous in the stream, so renumbering them from the row's first one gives 1, 2, ...
  segment_ids = np.where(real, input_doc - input_doc[0] + 1, 0)
  # A document's first input in this row: its start in the stream, or the row start if it began earlier.
  first_in_row = np.maximum(doc_offsets[np.maximum(input_doc, 0)] - start, 0)
  positions = np.where(real, np.arange(seq_len) - first_in_row, 0)
  return {
      'inputs': window[:-1],
      'targets': window[1:],
      'positions': positions.astype(np.int32),
      'segment_ids': segment_ids.astype(np.int32),
      'weights': (real & (target_doc == input_doc)).astype(np.float32),
  }


class _StreamRows(abc.ABC):
  """Shared plumbing: opens the memory map lazily so the source pickles cheaply into grain workers."""

  def __init__(self, stream: TokenStream, seq_len: int, pad_id: int):
    if seq_len < 1:
      raise ValueError(f'seq_len must be >= 1, got {seq_len}')
    self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id
    self._arrays: tuple[np.ndarray, np.ndarray] | None = None

  def _tokens_and_offsets(self) -> tuple[np.ndarray, np.ndarray]:
    if self._arrays is None:
      self._arrays = (self.stream.tokens, self.stream.doc_offsets)
    return self._arrays

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_arrays': None}

  def _example(self, start: int, stop: int) -> dict[str, np.ndarray]:
    tokens, offsets = self._tokens_and_offsets()
    return window_example(tokens, offsets, start, stop, self.seq_len, self.pad_id)

  def _check_index(self, index: int) -> int:
    if not 0 <= index < len(self):
      raise IndexError(f'row {index} out of range [0, {len(self)})')
    return index

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of rows."""


class PackedRows(_StreamRows):
  """Row r is stream tokens [r * seq_len, r * seq_len + seq_len + 1), the last one padded."""

  def __len__(self) -> int:
    return max(0, -(-(self.stream.num_tokens - 1) // self.seq_len))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    start = self._check_index(index) * self.seq_len
    return self._example(start, min(start + self.seq_len + 1, self.stream.num_tokens))


class DocumentRows(_StreamRows):
  """Row i is the first seq_len + 1 tokens of document i, padded."""

  def __len__(self) -> int:
    return self.stream.num_documents

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    _, offsets = self._tokens_and_offsets()
    start, end = int(offsets[self._check_index(index)]), int(offsets[index + 1])
    return self._example(start, min(end, start + self.seq_len + 1))


# data.packing -> row layout.
ROW_LAYOUTS = {True: PackedRows, False: DocumentRows}
