"""Contiguous training streams (``data.contiguous``): row b of every batch continues row b of the
batch before, so a model with a recurrent state (Transformer-XL's memory, lcr.mixers) carries it
from one step to the next, as Dai et al. 2019 train ("the hidden state sequence computed for the
previous segment is fixed and cached", §3.2).

The training split's token stream is cut into ``batch_size`` equal parts, one per batch row (each
process reads the parts of its own rows). Step k of an epoch gives row b the stream tokens
[k·L, k·L + L + 1) of part b, as ``inputs``/``targets``; an epoch has ⌊(part length − 1)/L⌋ steps
and the next starts every part again. The arrays are those of packed rows (lcr.data.packing), with
two differences that let the state tell documents apart across steps:

* ``positions`` count along the row's stream, from 0 at the start of its part and on across
  epochs (relative encodings and recurrences see only differences; config checks keep absolute
  encodings away);
* ``segment_ids`` name the document globally: 2 + its index + epoch · (number of documents), so
  they never repeat and never equal 1, the id of a row that replaces the stream (a passkey row,
  lcr.passkey.mix_passkey_batch), which the state therefore never continues.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lcr.config import fail
from lcr.data.token_cache import TokenStream

FIRST_DOCUMENT_ID = 2
EPOCHS = 100_000     # the source's length in epochs: read forever in practice


class ContiguousBatches:
  """A random-access source of batches: item n is step n's batch of this process's rows."""

  def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, local_rows: range):
    self.stream, self.seq_len, self.batch_size, self.rows = stream, seq_len, batch_size, local_rows
    self.part = (stream.num_tokens - 1) // batch_size
    self.steps_per_epoch = self.part // seq_len
    if self.steps_per_epoch < 1:
      fail('train.seq_len', seq_len, f'data.contiguous=True splits the {stream.num_tokens} tokens '
           f'of the split into train.batch_size={batch_size} streams of {self.part} tokens, '
           'fewer than one row; use a shorter train.seq_len, a smaller batch or a larger corpus')
    self._arrays: tuple[np.ndarray, np.ndarray] | None = None

  def __getstate__(self) -> dict[str, Any]:   # grain workers reopen the memory map
    return {**self.__dict__, '_arrays': None}

  def _tokens_and_offsets(self) -> tuple[np.ndarray, np.ndarray]:
    if self._arrays is None:
      self._arrays = (self.stream.tokens, self.stream.doc_offsets)
    return self._arrays

  def __len__(self) -> int:
    return self.steps_per_epoch * EPOCHS

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    epoch, step = divmod(int(index), self.steps_per_epoch)
    rows = [self.row(b, epoch, step) for b in self.rows]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

  def row(self, b: int, epoch: int, step: int) -> dict[str, np.ndarray]:
    """Row ``b`` of step ``step`` of ``epoch``: L inputs and targets of part b, in stream order."""
    tokens, offsets = self._tokens_and_offsets()
    length = self.seq_len
    start = b * self.part + step * length
    window = np.asarray(tokens[start:start + length + 1], np.int32)
    doc = np.searchsorted(offsets, np.arange(start, start + length + 1), side='right') - 1
    ids = FIRST_DOCUMENT_ID + doc + epoch * self.stream.num_documents
    return {
        'inputs': window[:-1],
        'targets': window[1:],
        'positions': ((epoch * self.steps_per_epoch + step) * length + np.arange(length)).astype(np.int32),
        'segment_ids': ids[:-1].astype(np.int32),
        'weights': (doc[:-1] == doc[1:]).astype(np.float32),
    }


def local_rows(batch_size: int, process_index: int, process_count: int) -> range:
  """The global batch rows process p reads: the p-th block of batch_size / process_count."""
  local = batch_size // process_count
  return range(process_index * local, (process_index + 1) * local)
