"""Tokenizers chosen by name: UTF-8 bytes, or sentencepiece BPE trained on the corpus' training split.

Every tokenizer reserves the same special ids (pad=0, bos=1, eos=2) and reports, per token id, how many
UTF-8 bytes of text it stands for (:meth:`Tokenizer.byte_lengths`), so evaluation can turn a summed
negative log-likelihood into bits per byte: ``bpb = nll_nats / (ln 2 * byte_lengths[targets].sum())``.
"""

from __future__ import annotations

import abc
import hashlib
import io
import logging
import os
import pathlib
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

if TYPE_CHECKING:
  from lcr.data.config import DataConfig

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
UNK_ID = 3  # BPE only; byte fallback means it is never produced.
# Training sentences are cut at a space to at most this many characters: sentencepiece skips longer
# sentences (max_sentence_length), and whole books or source files are far longer.
BPE_SENTENCE_CHARS = 2048
# The smallest BPE vocabulary that holds the 4 special pieces, the newline piece, the 256 byte-fallback
# pieces and the characters of a typical corpus (sentencepiece refuses to train below that).
MIN_BPE_VOCAB = 384
# sentencepiece's visible stand-in for a space inside pieces.
SPACE_SYMBOL = '\u2581'


def _as_id_array(ids: Iterable[int] | np.ndarray) -> np.ndarray:
  if not isinstance(ids, (np.ndarray, list, tuple)):
    ids = list(ids)
  return np.asarray(ids, np.int64).reshape(-1)


class Tokenizer(abc.ABC):
  """Text <-> int32 ids with pad/bos/eos specials and per-id UTF-8 byte counts."""

  pad_id: int = PAD_ID
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids; every id is in [0, vocab_size)."""

  @property
  @abc.abstractmethod
  def fingerprint(self) -> str:
    """A short name that changes whenever the text -> ids mapping changes (used as a cache key)."""

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """The int32 ids of ``text``, without bos/eos."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of ``ids``; special ids are dropped."""

  @abc.abstractmethod
  def byte_lengths(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes each id stands for (0 for specials, 1 for a byte piece)."""


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted past the specials: byte b is id b + 3, so the vocabulary has 259 ids."""

  num_special = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.num_special

  @property
  def fingerprint(self) -> str:
    return 'bytes'

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + self.num_special

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ids = _as_id_array(ids)
    data = (ids[ids >= self.num_special] - self.num_special).astype(np.uint8).tobytes()
    return data.decode('utf-8', errors='replace')

  def byte_lengths(self) -> np.ndarray:
    lengths = np.ones(self.vocab_size, np.int32)
    lengths[:self.num_special] = 0
    return lengths


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model trained by :func:`train_bpe` (identity normalization, byte fallback)."""

  def __init__(self, model_proto: bytes):
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self._fingerprint = hashlib.sha256(model_proto).hexdigest()[:12]
    self._byte_lengths = None
    self._space_symbol_ids = [self._processor.piece_to_id(f'<0x{b:02X}>') for b in SPACE_SYMBOL.encode()]
    got = (self._processor.pad_id(), self._processor.bos_id(), self._processor.eos_id())
    if got != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError(f'sentencepiece model has pad/bos/eos ids {got}, expected {PAD_ID, BOS_ID, EOS_ID}')

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    return cls(pathlib.Path(path).read_bytes())

  @property
  def vocab_size(self) -> int:
    return self._processor.vocab_size()

  @property
  def fingerprint(self) -> str:
    return f'bpe{self.vocab_size}-{self._fingerprint}'

  def encode(self, text: str) -> np.ndarray:
    # sentencepiece decodes a literal U+2581 in the text as a space, so that character is encoded as its
    # three byte-fallback pieces instead, which decode to the character itself.
    parts = text.split(SPACE_SYMBOL)
    ids = self._processor.encode(parts[0])
    for part in parts[1:]:
      ids += self._space_symbol_ids + self._processor.encode(part)
    return np.asarray(ids, np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    return self._processor.decode(_as_id_array(ids).tolist())

  def byte_lengths(self) -> np.ndarray:
    if self._byte_lengths is None:
      self._byte_lengths = self._compute_byte_lengths()
    return self._byte_lengths.copy()

  def _compute_byte_lengths(self) -> np.ndarray:
    sp = self._processor
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i):
        continue
      # SPACE_SYMBOL in a piece stands for a space: one byte of decoded text.
      lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace(SPACE_SYMBOL, ' ').encode())
    return lengths


def _cut_point(line: str) -> int:
  if len(line) <= BPE_SENTENCE_CHARS:
    return len(line)
  space = line.rfind(' ', 1, BPE_SENTENCE_CHARS)
  return space if space > 0 else BPE_SENTENCE_CHARS


def training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Lines of ``texts``, cut at spaces to <= BPE_SENTENCE_CHARS characters, up to ``max_bytes`` in all."""
  total = 0
  for text in texts:
    for line in text.split('\n'):
      while line:
        cut = _cut_point(line)
        sentence, line = line[:cut], line[cut:]
        total += len(sentence.encode('utf-8'))
        yield sentence
        if total >= max_bytes:
          return


def train_bpe(texts: Iterable[str], vocab_size: int, max_bytes: int) -> bytes:
  """Trains a lossless BPE sentencepiece model on ``texts``; returns the serialized model.

  Lossless means decode(encode(s)) == s for every string: identity normalization, no dummy prefix and
  no whitespace collapsing; characters outside the learned pieces fall back to their UTF-8 bytes. The
  newline is a piece of its own because training sentences are lines and would never contain it.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=training_sentences(texts, max_bytes), model_writer=model, model_type='bpe',
      vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, user_defined_symbols=['\n'],
      normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
      allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 16,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  return model.getvalue()


def bpe_model_path(data_cfg: DataConfig) -> pathlib.Path:
  """``<data_dir>/tokenizers/<corpus>_bpe_<vocab>.model`` (corpus name with ':' and '/' made '_')."""
  from lcr.data.config import resolve_data_dir, corpus_slug  # pylint: disable=import-outside-toplevel
  name = f'{corpus_slug(data_cfg.corpus)}_bpe_{data_cfg.vocab_size}.model'
  return resolve_data_dir(data_cfg) / 'tokenizers' / name


def _bytes_tokenizer(data_cfg: DataConfig) -> Tokenizer:
  del data_cfg
  return ByteTokenizer()


def _bpe_tokenizer(data_cfg: DataConfig) -> Tokenizer:
  """Loads the cached BPE model of this corpus and vocabulary size, training it first if missing."""
  path = bpe_model_path(data_cfg)
  if not path.exists():
    from lcr.data import corpora  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    texts = corpora.iter_texts(corpora.open_split(data_cfg, data_cfg.train_split))
    proto = train_bpe(texts, data_cfg.vocab_size, data_cfg.bpe_train_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f'{path.name}.partial-{uuid.uuid4().hex}')
    partial.write_bytes(proto)
    os.replace(partial, path)
    logging.info('trained %s in %.1f s', path, time.perf_counter() - start)
  return SentencePieceTokenizer.from_file(path)


TOKENIZERS = {
    'bytes': _bytes_tokenizer,
    'bpe': _bpe_tokenizer,
}


def get_tokenizer(data_cfg: DataConfig) -> Tokenizer:
  """The tokenizer named by ``data.tokenizer`` (BPE is trained once per corpus and vocabulary size)."""
  return TOKENIZERS[data_cfg.tokenizer](data_cfg)
