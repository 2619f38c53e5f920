"""Training batches of a generated task through grain: examples → packed (or padded) rows → batches.

Example i of the training stream is ``tasks.train_example(task, i)`` turned into the arch's features
(lcr.seq2seq.arch); process p of P reads examples p, p + P, …. With ``task.pack`` > 1, grain's
first-fit packing (one bin per row of the batch) fills each row with whole examples and adds
``<feature>_segment_ids`` (1, 2, … per example, 0 at padding) and ``<feature>_positions``
(restarting at 0 in every example); with pack = 1 each row holds one example, padded, with the
same keys. The iterator's state is saved in every checkpoint, so a resumed run sees the batches
an uninterrupted one would have.
"""

from __future__ import annotations

import grain
import grain.experimental as grain_experimental
import numpy as np

from lcr.config import Config, fail


class TrainExamples:
  """Random access to the training stream of one process, as features (an unbounded source)."""

  def __init__(self, config: Config, arch, process_index: int = 0, process_count: int = 1):
    self.task, self.arch = config.seq2seq.task, arch
    self.process_index, self.process_count = process_index, process_count

  def __len__(self) -> int:
    return 2 ** 31 - 1

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    from lcr.seq2seq import tasks
    source, target = tasks.train_example(self.task, index * self.process_count + self.process_index)
    return self.arch.features(tasks.encode(source), tasks.encode(target + [tasks.EOS]))


def pad_example(example: dict[str, np.ndarray], lengths: dict[str, int]) -> dict[str, np.ndarray]:
  """One example in a row of its own, with the keys grain's packing writes."""
  out = {}
  for key, value in example.items():
    n, size = len(value), lengths[key]
    out[key] = np.zeros(size, value.dtype)
    out[key][:n] = value
    out[f'{key}_segment_ids'] = (np.arange(size) < n).astype(np.int32)
    out[f'{key}_positions'] = np.where(np.arange(size) < n, np.arange(size), 0).astype(np.int32)
  return out


def make_train_iterator(config: Config, arch, batch_size: int, *, pack: int | None = None,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """A checkpointable iterator over training batches (dicts of [batch / processes, row] arrays)."""
  if batch_size % process_count:
    fail('train.batch_size', batch_size, f'must be a multiple of the {process_count} processes')
  pack = config.seq2seq.task.pack if pack is None else pack
  lengths = {k: v * pack for k, v in arch.row_lengths().items()}
  dataset = grain.MapDataset.source(TrainExamples(config, arch, process_index, process_count))
  local = batch_size // process_count
  if pack > 1:
    dataset = grain_experimental.FirstFitPackIterDataset(
        dataset.to_iter_dataset(), length_struct=lengths, num_packing_bins=local,
        shuffle_bins=False)
  else:
    dataset = dataset.map(lambda example: pad_example(example, lengths)).to_iter_dataset()
  return iter(dataset.batch(local, drop_remainder=True))
