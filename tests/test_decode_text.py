"""Streaming detokenisation and stop strings (lcr.decode.text.StreamPrinter), bytes and BPE."""

import io

import pytest

from lcr.data import builders
from lcr.data.config import DataConfig
from lcr.data.tokenizers import ByteTokenizer, get_tokenizer
from lcr.decode.text import StreamPrinter

TEXT = 'In the beginning — «héllo» 日本 🙂 the end.'


def stream(tokenizer, text, stops=()):
  out = io.StringIO()
  printer = StreamPrinter(tokenizer, stops, out)
  pieces, stopped = [], False
  for token in tokenizer.encode(text):
    before = out.getvalue()
    stopped = printer.add(token)
    pieces.append(out.getvalue()[len(before):])
    if stopped:
      break
  return printer.finish(), out.getvalue(), pieces, stopped


def test_bytes_stream_without_broken_characters():
  final, printed, pieces, stopped = stream(ByteTokenizer(), TEXT)
  assert final == printed == TEXT and not stopped
  assert all('\ufffd' not in p for p in pieces)
  assert sum(1 for p in pieces if p) > 20          # printed as it came, not at the end


def test_stop_string_ends_the_text_before_it_and_is_never_printed():
  final, printed, pieces, stopped = stream(ByteTokenizer(), TEXT, stops=('héllo', 'zzz'))
  assert stopped and final == printed == 'In the beginning — «'
  assert 'h' not in ''.join(pieces[-6:])          # the stop's prefix was held back, then dropped


def test_a_text_that_merely_starts_like_a_stop_string_is_printed_in_full():
  final, printed, _, stopped = stream(ByteTokenizer(), 'the end', stops=('endless',))
  assert not stopped and final == printed == 'the end'


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('bpe')
  builders.prepare('bible', str(data_dir))
  return get_tokenizer(DataConfig(corpus='bible', tokenizer='bpe', vocab_size=512,
                                  data_dir=str(data_dir)))


def test_bpe_stream_detokenises_to_the_text(bpe):
  final, printed, pieces, _ = stream(bpe, TEXT)
  assert final == printed == TEXT
  assert all('\ufffd' not in p for p in pieces)
  final, _, _, stopped = stream(bpe, TEXT, stops=('日本',))
  assert stopped and final == 'In the beginning — «héllo» '
