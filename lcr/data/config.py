"""The data room's frozen config: ``from_mapping(DataConfig, config_dict.data, 'data')``."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

from lcr.config import check_choice, check_positive, fail
from lcr.data.corpora import BUILTIN_CORPORA, TFDS_PREFIX
from lcr.data.tokenizers import MIN_BPE_VOCAB, TOKENIZERS

# The names of lcr.data.tasks.TASKS and lcr.passkey.FORMATS, so that validating a config needs no
# JAX import (tests/test_tasks.py checks that they agree).
TASKS = ('lm', 'mqar', 'passkey')
PASSKEY_FORMATS = ('mj', 'compact')
DATA_DIR_ENV = 'LCR_DATA_DIR'
DEFAULT_DATA_DIR = '~/.cache/lcr/data'


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which corpus, how it is tokenized, and how training rows are packed, shuffled and read."""

  # 'bible', 'pystdlib', or 'tfds:<name>' for a TensorFlow Datasets dataset prepared in array_record
  # format under data_dir (e.g. 'tfds:pg19' with text_key='book_text', 'tfds:lm1b', 'tfds:wiki40b/en').
  corpus: str = 'bible'
  # Feature holding the document text (tfds corpora only; the built-in corpora always use 'text').
  text_key: str = 'text'
  # Split that training reads and BPE is trained on; tfds slicing works ('train[:10%]').
  train_split: str = 'train'
  tokenizer: str = 'bytes'  # 'bytes' (259 ids) | 'bpe' (sentencepiece, vocab_size ids)
  vocab_size: int = 4096  # BPE only.
  bpe_train_bytes: int = 100_000_000  # BPE trains on at most this many bytes of the training split.
  # Where corpora, tokenizers and token caches live; '' means $LCR_DATA_DIR, else ~/.cache/lcr/data.
  data_dir: str = ''
  # True: documents are concatenated and cut into full rows (a long document continues in the next
  # row). False: one document per row, truncated to seq_len + 1 tokens and padded.
  packing: bool = True
  # True: row b of every batch continues row b of the batch before, each row reading its own
  # contiguous part of the training stream (lcr.data.contiguous), so a model with a recurrent state
  # (model.memory, model.mixer) carries it from step to step. Needs packing and no shuffling.
  contiguous: bool = False
  shuffle: bool = True
  shuffle_seed: int = 0  # Combined with the trainer's seed; rows are reshuffled every epoch.
  num_workers: int = 0  # grain worker processes (0: read in the main process).
  read_threads: int = 1  # grain threads assembling batches per process (0: on the consumer's thread).
  prefetch_batches: int = 4  # Batches grain assembles ahead of the consumer.
  # What training reads: 'lm' (language modelling on the corpus) or a synthetic retrieval task of
  # lcr/data/tasks.py with loss on the answers only: 'mqar' (multi-query associative recall, Arora
  # et al. 2023) or 'passkey' (Mohtashami & Jaggi 2023, in data.tokenizer's tokens).
  task: str = 'lm'
  mqar_pairs: int = 8  # mqar: key-value pairs per example, each queried once.
  mqar_vocab: int = 64  # mqar: size of each of the key, value and filler alphabets.
  mqar_queries: int = 0  # mqar: queries per example (every key at least once; 0 = one per key).
  passkey_format: str = 'compact'  # passkey: the prompt (lcr.passkey.FORMATS).

  def __post_init__(self):
    if self.corpus.startswith(TFDS_PREFIX):
      if not self.corpus[len(TFDS_PREFIX):].strip():
        fail('data.corpus', self.corpus, "'tfds:' must be followed by a dataset name, e.g. 'tfds:pg19'")
    elif self.corpus not in BUILTIN_CORPORA:
      allowed = ', '.join(map(repr, sorted(BUILTIN_CORPORA)))
      fail('data.corpus', self.corpus,
           f"allowed values are {allowed}, or 'tfds:<name>' for a TensorFlow Datasets dataset")
    if not self.text_key:
      fail('data.text_key', self.text_key, 'must name the text feature, e.g. text')
    if not self.train_split:
      fail('data.train_split', self.train_split, 'must name a split, e.g. train')
    check_choice('data.tokenizer', self.tokenizer, TOKENIZERS)
    if self.tokenizer == 'bpe' and self.vocab_size < MIN_BPE_VOCAB:
      fail('data.vocab_size', self.vocab_size,
           f'BPE needs >= {MIN_BPE_VOCAB} (256 byte pieces, specials and the characters of the corpus)')
    check_positive('data.bpe_train_bytes', self.bpe_train_bytes)
    if self.contiguous and (self.shuffle or not self.packing):
      fail('data.contiguous', self.contiguous, 'reads each row\'s stream in order: it needs '
           'data.packing=True and data.shuffle=False')
    if not 0 <= self.shuffle_seed < 2**32:
      fail('data.shuffle_seed', self.shuffle_seed, 'must be in [0, 2**32)')
    for field in ('num_workers', 'read_threads', 'prefetch_batches'):
      if getattr(self, field) < 0:
        fail(f'data.{field}', getattr(self, field), 'must be >= 0')
    check_choice('data.task', self.task, TASKS)
    if self.contiguous and self.task != 'lm':
      fail('data.contiguous', self.contiguous, f'continues a language-modelling stream from step to '
           f'step; data.task={self.task!r} makes independent examples: use data.contiguous=False')
    check_positive('data.mqar_pairs', self.mqar_pairs)
    if self.mqar_vocab < self.mqar_pairs:
      fail('data.mqar_vocab', self.mqar_vocab,
           f'needs at least data.mqar_pairs={self.mqar_pairs} keys (keys are drawn without repeats)')
    if self.mqar_queries and self.mqar_queries < self.mqar_pairs:
      fail('data.mqar_queries', self.mqar_queries,
           f'every key is queried: use >= data.mqar_pairs={self.mqar_pairs}, or 0 (one per key)')
    check_choice('data.passkey_format', self.passkey_format, PASSKEY_FORMATS)


def resolve_data_dir(data_cfg: DataConfig) -> pathlib.Path:
  """``data.data_dir``, else ``$LCR_DATA_DIR``, else ``~/.cache/lcr/data``; '~' expanded."""
  chosen = data_cfg.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return pathlib.Path(chosen).expanduser()


def corpus_slug(corpus: str) -> str:
  """A file-name-safe form of a corpus name: 'tfds:wiki40b/en' -> 'tfds_wiki40b_en'."""
  return re.sub(r'[^A-Za-z0-9.\-]+', '_', corpus).strip('_')
