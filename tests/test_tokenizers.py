"""Tests of the tokenizers: lossless round trips, byte accounting and the cached BPE model."""

from __future__ import annotations

import numpy as np
import pytest

from lcr.data import builders, tokenizers
from lcr.data.config import DataConfig
from lcr.data.pipeline import count_text_bytes, load_eval_tokens
from lcr.data.tokenizers import ByteTokenizer, get_tokenizer

SAMPLES = [
    '',
    'In the beginning God created the heavens and the earth.',
    'Héllo wörld — 日本語 🙂 Ελληνικά',
    '\n\n  two  spaces,\ttab, trailing space ',
    'def f(x):\n    return x ** 2  # comment\n',
    'a literal \u2581 lower-block character and \x00 a NUL',
]


@pytest.fixture(scope='module')
def bpe_cfg(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('lcr_tok')
  builders.prepare('bible', str(data_dir))
  return DataConfig(corpus='bible', tokenizer='bpe', vocab_size=512, data_dir=str(data_dir))


@pytest.mark.parametrize('text', SAMPLES)
def test_bytes_tokenizer_is_shifted_utf8(text):
  tokenizer = ByteTokenizer()
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == [b + 3 for b in text.encode('utf-8')]
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode([tokenizer.bos_id, *ids.tolist(), tokenizer.eos_id, tokenizer.pad_id]) == text
  assert tokenizer.byte_lengths()[ids].sum() == len(text.encode('utf-8'))
  assert tokenizer.vocab_size == 259 and tokenizer.byte_lengths()[:3].tolist() == [0, 0, 0]


@pytest.mark.parametrize('text', SAMPLES)
def test_bpe_round_trips_and_counts_bytes(bpe_cfg, text):
  tokenizer = get_tokenizer(bpe_cfg)
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and (ids.size == 0 or 3 <= ids.min() <= ids.max() < 512)
  assert tokenizer.decode(ids) == text
  assert tokenizer.byte_lengths()[ids].sum() == len(text.encode('utf-8'))


def test_bpe_vocabulary_and_specials(bpe_cfg):
  tokenizer = get_tokenizer(bpe_cfg)
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (512, 0, 1, 2)
  lengths = tokenizer.byte_lengths()
  assert lengths.shape == (512,) and lengths[:4].tolist() == [0, 0, 0, 0]  # pad, bos, eos, unk.
  assert lengths.max() > 1  # Merges were learned.
  # English prose compresses: fewer tokens than bytes.
  text = SAMPLES[1] * 4
  assert len(tokenizer.encode(text)) < 0.6 * len(text)


def test_bpe_is_trained_once_and_reused(bpe_cfg, monkeypatch):
  first = get_tokenizer(bpe_cfg)
  path = tokenizers.bpe_model_path(bpe_cfg)
  assert path.name == 'bible_bpe_512.model' and path.parent.name == 'tokenizers'
  mtime = path.stat().st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError('BPE was retrained')

  monkeypatch.setattr(tokenizers, 'train_bpe', fail)
  again = get_tokenizer(bpe_cfg)
  assert path.stat().st_mtime_ns == mtime and again.fingerprint == first.fingerprint


def test_bpe_eval_stream_accounts_for_every_byte(bpe_cfg):
  tokenizer = get_tokenizer(bpe_cfg)
  stream = load_eval_tokens(bpe_cfg, 'validation')
  tokens = np.asarray(stream.tokens, np.int32)
  assert count_text_bytes(tokens, tokenizer.byte_lengths()) == stream.num_bytes
  first = stream.documents()[0]
  assert first[0] == tokenizer.bos_id and first[-1] == tokenizer.eos_id
  assert tokenizer.decode(first).startswith('Now it happened after the death of Moses')  # Joshua.


def test_training_sentences_are_lines_capped_in_length_and_total():
  text = 'word ' * 2000 + '\nsecond line'
  sentences = list(tokenizers.training_sentences([text], max_bytes=10**9))
  assert all(len(s) <= tokenizers.BPE_SENTENCE_CHARS for s in sentences)
  assert ''.join(sentences) == text.replace('\n', '')
  assert sum(len(s) for s in tokenizers.training_sentences([text], max_bytes=100)) < 100 + 2048
