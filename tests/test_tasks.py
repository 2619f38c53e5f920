"""Retrieval tasks as data sources (lcr.data.tasks) and their recall evaluation (lcr.retrieval)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import passkey, retrieval
from lcr.config import ConfigError
from lcr.data import config as data_config, tasks
from lcr.data.config import DataConfig


class Bytes:
  """UTF-8 bytes as token ids (the byte tokenizer without its specials)."""
  vocab_size = 256

  def encode(self, text):
    return list(text.encode('utf-8'))


def recall_by_scanning(tokens: np.ndarray, at: int, pairs_end: int) -> int:
  """MQAR's answer at the query token ``at``: the token after the query key's first occurrence."""
  first = int(np.flatnonzero(tokens[:pairs_end] == tokens[at])[0])
  return int(tokens[first + 1])


@pytest.mark.parametrize('queries', [0, 9])
def test_mqar_layout_answers_and_depth(queries):
  task = tasks.Mqar(pairs=3, alphabet=10, queries=queries)
  q = queries or 3
  for depth in (0.0, 0.4, 1.0):
    ex = task.example(np.random.default_rng(5), 40, depth)
    n_fill = 40 - (6 + q + 1)
    start = round(depth * n_fill)                     # the pairs sit after this much filler
    keys, values = ex.tokens[start:start + 6:2], ex.tokens[start + 1:start + 6:2]
    assert len(set(keys)) == 3 and all(1 <= k <= 10 for k in keys)
    assert all(11 <= v <= 20 for v in values)
    filler = np.r_[ex.tokens[:start], ex.tokens[start + 6:40 - q - 1], ex.tokens[-1:]]
    assert np.all(filler >= 21)
    asked = ex.tokens[40 - q - 1:40 - 1]
    assert set(asked) == set(keys)                    # every key queried
    np.testing.assert_array_equal(np.flatnonzero(ex.answers), np.arange(40 - q - 1, 39))
    for j in np.flatnonzero(ex.answers):              # the value of the queried key
      assert ex.targets[j] == recall_by_scanning(ex.tokens, j, start + 6)
    # Targets elsewhere are the next token; no value appears after the pairs (no elimination).
    np.testing.assert_array_equal(ex.targets[~ex.answers], ex.tokens[1:][~ex.answers])
    assert not np.isin(ex.tokens[start + 6:], values).any()


def test_passkey_task_answers_are_the_key_and_its_filler_starts_anywhere():
  task = tasks.Passkey(Bytes(), 'compact', None)
  unit = passkey.FORMATS['compact'].filler
  starts = set()
  for seed in range(6):
    ex = task.example(np.random.default_rng(seed), 80, 0.0)
    text = bytes(ex.tokens.tolist()).decode()
    key = text[-5:]
    needle = f'The pass key is {key}. '
    assert key.isdigit() and text.startswith(needle)
    assert bytes(ex.targets[ex.answers].tolist()).decode() == key
    np.testing.assert_array_equal(ex.targets, ex.tokens[1:])
    filler = text[len(needle):-len('The pass key is ') - 5]
    assert filler in unit * 3                                   # the filler text, cut anywhere
    starts.add((unit * 2).index(filler[:30]))
  assert len(starts) > 3
  assert tasks.Passkey(Bytes(), 'compact', None).min_length == len('The pass key is 12345. ') + len(
      'The pass key is ') + 5


def test_rows_are_deterministic_by_seed_and_weigh_the_answers_only():
  task = tasks.Mqar(pairs=2, alphabet=8)
  a = tasks.row(task, 3, tasks.TRAIN_STREAM, 24, 17)
  b = tasks.row(task, 3, tasks.TRAIN_STREAM, 24, 17)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert any(not np.array_equal(a['inputs'], tasks.row(task, s, 0, 24, 17)['inputs'])
             for s in (4, 5))
  lengths = set()
  for i in range(40):
    row = tasks.row(task, 0, tasks.TRAIN_STREAM, 24, i)
    n = int(row['segment_ids'].sum())                  # the example's targets; then padding
    lengths.add(n + 1)
    assert row['weights'].sum() == 2 and set(np.unique(row['weights'])) <= {0.0, 1.0}
    scored = np.flatnonzero(row['weights'])
    np.testing.assert_array_equal(scored, np.arange(n - 2, n))   # the two queries at the end
    assert np.all(row['targets'][scored] >= 9) and np.all(row['targets'][scored] <= 16)   # values
    assert np.all(row['segment_ids'][n:] == 0) and np.all(row['weights'][n:] == 0)
  assert min(lengths) >= task.min_length and max(lengths) <= 25 and len(lengths) > 5


def test_grain_source_resumes_and_splits_over_processes():
  task = tasks.Mqar(pairs=2, alphabet=8)
  kwargs = dict(seq_len=16, batch_size=4, seed=1)
  it = iter(tasks.make_task_dataset(task, **kwargs))
  next(it)
  state = it.get_state()
  second = next(it)
  again = iter(tasks.make_task_dataset(task, **kwargs))
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['inputs'], second['inputs'])
  halves = [next(iter(tasks.make_task_dataset(task, **kwargs, process_index=p, process_count=2)))
            for p in (0, 1)]
  first = next(iter(tasks.make_task_dataset(task, **kwargs)))
  np.testing.assert_array_equal(np.concatenate([h['inputs'] for h in halves])[[0, 2, 1, 3]],
                                first['inputs'])       # process p reads rows p, p + 2, ...
  val = tasks.validation_batches(task, num_batches=2, **kwargs)
  assert not np.array_equal(val[0]['inputs'], first['inputs'])


def test_config_names_agree_and_errors_name_the_field():
  assert set(data_config.TASKS) == {'lm', *tasks.TASKS}
  assert set(data_config.PASSKEY_FORMATS) == set(passkey.FORMATS)
  for field, kwargs in (('data.task', dict(task='copy')), ('data.mqar_vocab', dict(mqar_vocab=4)),
                        ('data.mqar_queries', dict(mqar_queries=3)),
                        ('data.passkey_format', dict(passkey_format='long'))):
    with pytest.raises(ConfigError, match=field):
      DataConfig(**kwargs)
  with pytest.raises(ConfigError, match='train.seq_len'):
    tasks.check_length(tasks.get_task(DataConfig(task='mqar', mqar_pairs=8)), 20)


def recall_within(window: int, vocab: int):
  """A model that recalls by exact lookup, but only of keys at most ``window`` tokens back."""
  def apply_fn(tokens, positions, segment_ids):
    t = tokens.shape[1]
    i, j = jnp.arange(t)[None, :, None], jnp.arange(t)[None, None, :]
    match = (tokens[:, None, :] == tokens[:, :, None]) & (j < i) & (i - j <= window)
    first = jnp.argmax(match, axis=-1)                        # earliest matching key in reach
    nxt = jnp.take_along_axis(tokens, jnp.minimum(first + 1, t - 1), axis=1)
    guess = jnp.where(match.any(-1), nxt, 0)
    return jax.nn.one_hot(guess, vocab) * 10.0
  return apply_fn


def test_recall_accuracy_by_depth_against_hand_counts():
  task = tasks.Mqar(pairs=2, alphabet=8)
  perfect = retrieval.recall_accuracy(recall_within(10_000, task.vocab_size), task, length=40,
                                      depths=[0.0, 1.0], trials=3)
  assert [r['accuracy'] for r in perfect] == [1.0, 1.0]
  assert [r['answer_accuracy'] for r in perfect] == [1.0, 1.0] and perfect[0]['correct'] == 3
  # 40 tokens, 34 of filler: at depth 1 the pairs end right before the queries; at depth 0 they
  # lie ≥ 34 tokens back, beyond a window of 20.
  short = retrieval.recall_accuracy(recall_within(20, task.vocab_size), task, length=40,
                                    depths=[0.0, 1.0], trials=3)
  assert [(r['accuracy'], r['answer_accuracy']) for r in short] == [(0.0, 0.0), (1.0, 1.0)]
