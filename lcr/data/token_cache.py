"""Tokenized splits, computed once and memory-mapped: the flat token stream plus document offsets.

Each document is stored as ``[bos] + encode(text) + [eos]``; documents are concatenated in corpus order.
A split lives in ``<data_dir>/tokens/<corpus>/<tokenizer fingerprint>/<split>/`` as ``tokens.bin`` (raw
uint16 when the vocabulary fits, else int32), ``doc_offsets.npy`` (int64 [documents + 1]) and
``meta.json``; the directory is written under a temporary name and renamed when complete, so a
half-written cache is never read. The tokenizer fingerprint changes with the BPE model, so retraining
never reuses stale ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
import uuid

import numpy as np

from lcr.data import corpora
from lcr.data.config import DataConfig, corpus_slug, resolve_data_dir
from lcr.data.tokenizers import Tokenizer, get_tokenizer


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """The concatenated tokens of one split and where each document starts.

  ``tokens[doc_offsets[i]:doc_offsets[i + 1]]`` is document i including its bos and eos; ``num_bytes`` is
  the UTF-8 size of the split's text (what bits per byte divide by).
  """

  directory: pathlib.Path
  num_tokens: int
  num_documents: int
  num_bytes: int
  dtype: str

  @classmethod
  def open(cls, directory: pathlib.Path) -> TokenStream:
    meta = json.loads((directory / 'meta.json').read_text())
    return cls(directory=directory, num_tokens=meta['num_tokens'], num_documents=meta['num_documents'],
               num_bytes=meta['num_bytes'], dtype=meta['dtype'])

  @property
  def tokens(self) -> np.ndarray:
    """[num_tokens] memory-mapped ids (uint16 or int32); index it, then cast to int32."""
    return np.memmap(self.directory / 'tokens.bin', dtype=self.dtype, mode='r', shape=(self.num_tokens,))

  @property
  def doc_offsets(self) -> np.ndarray:
    """int64 [num_documents + 1]: start of each document in ``tokens``, then ``num_tokens``."""
    return np.load(self.directory / 'doc_offsets.npy')

  def documents(self) -> list[np.ndarray]:
    """Every document's int32 tokens (bos ... eos), in corpus order."""
    tokens, offsets = np.asarray(self.tokens, np.int32), self.doc_offsets
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _split_dir_name(split: str) -> str:
  safe = corpus_slug(split)
  return safe if safe == split else f'{safe}-{hashlib.sha256(split.encode()).hexdigest()[:8]}'


def cache_directory(data_cfg: DataConfig, tokenizer: Tokenizer, split: str) -> pathlib.Path:
  root = resolve_data_dir(data_cfg) / 'tokens' / corpus_slug(data_cfg.corpus)
  if data_cfg.corpus.startswith(corpora.TFDS_PREFIX):
    root = root / corpus_slug(data_cfg.text_key)
  return root / tokenizer.fingerprint / _split_dir_name(split)


def _write_split(data_cfg: DataConfig, tokenizer: Tokenizer, split: str, directory: pathlib.Path):
  """Tokenizes every document of ``split`` into ``directory`` (a fresh temporary directory)."""
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  offsets, num_bytes = [0], 0
  with open(directory / 'tokens.bin', 'wb') as out:
    for text in corpora.iter_texts(corpora.open_split(data_cfg, split)):
      ids = tokenizer.encode(text)
      document = np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(dtype)
      out.write(document.tobytes())
      offsets.append(offsets[-1] + len(document))
      num_bytes += len(text.encode('utf-8'))
  np.save(directory / 'doc_offsets.npy', np.asarray(offsets, np.int64))
  meta = {'corpus': data_cfg.corpus, 'split': split, 'tokenizer': tokenizer.fingerprint,
          'num_tokens': offsets[-1], 'num_documents': len(offsets) - 1, 'num_bytes': num_bytes,
          'dtype': np.dtype(dtype).name}
  (directory / 'meta.json').write_text(json.dumps(meta, indent=2))


def load_tokens(data_cfg: DataConfig, split: str, tokenizer: Tokenizer | None = None) -> TokenStream:
  """The tokenized ``split`` of ``data.corpus``, tokenizing (and building the corpus) on first use."""
  tokenizer = tokenizer or get_tokenizer(data_cfg)
  directory = cache_directory(data_cfg, tokenizer, split)
  if not (directory / 'meta.json').exists():
    start = time.perf_counter()
    partial = directory.with_name(f'{directory.name}.partial-{uuid.uuid4().hex}')
    partial.mkdir(parents=True)
    _write_split(data_cfg, tokenizer, split, partial)
    try:
      os.replace(partial, directory)
    except OSError:  # Another process finished the same cache first; theirs is identical.
      shutil.rmtree(partial, ignore_errors=True)
    logging.info('tokenized %s in %.1f s', directory, time.perf_counter() - start)
  stream = TokenStream.open(directory)
  if stream.num_documents == 0:
    raise corpora.CorpusUnavailableError(f'split {split!r} of corpus {data_cfg.corpus!r} has no documents')
  return stream
