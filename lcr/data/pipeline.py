"""The grain input pipeline: tokenized corpus -> packed rows -> host shard -> shuffle -> repeat -> batch.

Training batches are dicts of numpy ``[batch_size // process_count, seq_len]`` arrays with the keys
described in :mod:`lcr.data.packing` (inputs, targets, positions, segment_ids, weights).

The iterator is a ``grain.DatasetIterator`` whose whole state is the index of the next batch, so it is
saved and restored exactly, mid-epoch included::

    state = iterator.get_state()            # a small JSON-serializable dict
    iterator = make_train_iterator(...)     # same config and arguments
    iterator.set_state(state)               # next(iterator) is the batch that would have come next

With orbax (grain registers its handler for these args, one JSON file per process)::

    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=grain.checkpoint.CheckpointSave(iterator)))
    iterator = make_train_iterator(...)
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
    # ``iterator`` now continues where the saved one stopped.
"""

from __future__ import annotations

import grain
import numpy as np

from lcr.config import fail
from lcr.data import contiguous
from lcr.data.config import DataConfig
from lcr.data.packing import ROW_LAYOUTS, DocumentRows, PackedRows
from lcr.data.token_cache import TokenStream, load_tokens
from lcr.data.tokenizers import get_tokenizer


def combined_seed(data_cfg: DataConfig, seed: int) -> int:
  """One 32-bit shuffle seed from the trainer's seed and ``data.shuffle_seed`` (order matters)."""
  if seed < 0:
    raise ValueError(f'seed must be >= 0, got {seed}')
  return int(np.random.SeedSequence([data_cfg.shuffle_seed, seed]).generate_state(1)[0])


def train_rows(data_cfg: DataConfig, seq_len: int) -> PackedRows | DocumentRows:
  """All rows of one epoch of the training split, in stream order (packed or one per document)."""
  tokenizer = get_tokenizer(data_cfg)
  stream = load_tokens(data_cfg, data_cfg.train_split, tokenizer)
  return ROW_LAYOUTS[data_cfg.packing](stream, seq_len, tokenizer.pad_id)


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'need 0 <= process_index < process_count, got {process_index}, {process_count}')
  if batch_size < 1 or batch_size % process_count:
    fail('train.batch_size', batch_size, f'the global batch must be a positive multiple of the '
         f'{process_count} processes, each of which reads its own rows')
  return batch_size // process_count


def _allow_grain_workers() -> None:
  """grain worker processes read absl flags, which raise unless parsed; mark them parsed if no app did."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_dataset(data_cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite batches for this process; ``batch_size`` is global (each process gets its share).

  Process p reads rows p, p + process_count, ... of the epoch, so shards are disjoint and cover every
  row. Each epoch is shuffled afresh (grain folds the epoch into the seed); with ``data.shuffle`` off,
  rows come in stream order.
  """
  local_batch = _check_sharding(batch_size, process_index, process_count)
  if data_cfg.contiguous:
    return _contiguous_dataset(data_cfg, seq_len, batch_size, process_index, process_count)
  rows = train_rows(data_cfg, seq_len)
  dataset = grain.MapDataset.source(rows)[process_index::process_count]
  if len(dataset) == 0:
    fail('train.seq_len', seq_len, f'the {data_cfg.train_split!r} split of {data_cfg.corpus!r} '
         f'makes only {len(rows)} rows of that length, so process {process_index} of '
         f'{process_count} gets none; use a shorter train.seq_len or a larger corpus')
  if data_cfg.shuffle:
    dataset = dataset.shuffle(seed=combined_seed(data_cfg, seed))
  dataset = dataset.repeat().batch(local_batch, drop_remainder=True)
  read_options = grain.ReadOptions(num_threads=data_cfg.read_threads,
                                   prefetch_buffer_size=data_cfg.prefetch_batches)
  iter_dataset = dataset.to_iter_dataset(read_options)
  if data_cfg.num_workers:
    _allow_grain_workers()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter_dataset


def _contiguous_dataset(data_cfg: DataConfig, seq_len: int, batch_size: int, process_index: int,
                        process_count: int) -> grain.IterDataset:
  """Batches whose rows continue from step to step (lcr.data.contiguous); not shuffled."""
  stream = load_tokens(data_cfg, data_cfg.train_split, get_tokenizer(data_cfg))
  source = contiguous.ContiguousBatches(
      stream, seq_len, batch_size, contiguous.local_rows(batch_size, process_index, process_count))
  read_options = grain.ReadOptions(num_threads=data_cfg.read_threads,
                                   prefetch_buffer_size=data_cfg.prefetch_batches)
  return grain.MapDataset.source(source).to_iter_dataset(read_options)


def make_train_iterator(data_cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """A checkpointable iterator over training batches (see the module docstring for save/restore)."""
  return iter(make_train_dataset(data_cfg, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count))


def prepare_data(data_cfg: DataConfig, splits: tuple[str, ...] = ('validation', 'test')
                 ) -> dict[str, TokenStream]:
  """Builds the corpus, trains the tokenizer and tokenizes the training split and ``splits``.

  Idempotent, and a no-op once done. Everything is also prepared lazily on first use; call this on one
  process before the others start when several processes share a data_dir, so they do not race.
  """
  tokenizer = get_tokenizer(data_cfg)
  return {split: load_tokens(data_cfg, split, tokenizer) for split in (data_cfg.train_split, *splits)}


def load_eval_tokens(data_cfg: DataConfig, split: str) -> TokenStream:
  """The token stream of an evaluation split ('validation', 'test' or any tfds split string).

  ``stream.tokens`` is every document as [bos] + tokens + [eos], concatenated; ``stream.doc_offsets``
  marks where each starts; ``stream.documents()`` lists them; ``stream.num_bytes`` is the UTF-8 size of
  the split's text, the denominator of bits per byte.
  """
  return load_tokens(data_cfg, split)


def count_text_bytes(tokens: np.ndarray, byte_lengths: np.ndarray) -> int:
  """UTF-8 bytes that ``tokens`` stand for (specials count 0): the bits-per-byte denominator of a window."""
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= len(byte_lengths)):
    raise ValueError(f'token ids must be in [0, {len(byte_lengths)}), got [{tokens.min()}, {tokens.max()}]')
  return int(np.asarray(byte_lengths, np.int64)[tokens].sum())
