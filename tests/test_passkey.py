"""Passkey prompts, teacher-forced scoring and the training mix of lcr.passkey."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import passkey
from lcr.config import ConfigError, EvalConfig

VOCAB = 256


class Bytes:
  """UTF-8 bytes as token ids: one token per byte, as in the byte-level tokenizer."""

  def encode(self, text):
    return list(text.encode('utf-8'))

  def decode(self, ids):
    return bytes(int(i) for i in ids).decode('utf-8')


def test_mj_prompt_text_and_depth():
  tok = Bytes()
  ex = passkey.make_example(tok, 400, 0.5, 12345, fmt='mj')
  text = tok.decode(ex.tokens)
  assert len(ex.tokens) == 400
  assert text.startswith('There is an important info hidden inside a lot of irrelevant text.')
  assert text.endswith('What is the pass key? The pass key is 12345')
  assert tok.decode(ex.tokens[ex.answer_start:]) == '12345'
  needle = 'The pass key is 12345. Remember it. 12345 is the pass key. '
  intro = len(passkey.FORMATS['mj'].intro)
  n_fill = 400 - intro - len(needle) - len('What is the pass key? The pass key is ') - 5
  assert text.index(needle) == intro + round(0.5 * n_fill)
  assert 'The grass is green. The sky is blue.' in text
  first, last = (passkey.make_example(tok, 400, d, 12345) for d in (0.0, 1.0))
  assert tok.decode(first.tokens).index(needle) == intro
  assert tok.decode(last.tokens).endswith(needle + 'What is the pass key? The pass key is 12345')


def test_prompt_too_long_for_length_is_an_error():
  with pytest.raises(ValueError, match='needs at least'):
    passkey.make_example(Bytes(), 64, 0.5, 12345, fmt='mj')
  assert len(passkey.make_example(Bytes(), 64, 0.5, 12345, fmt='compact').tokens) == 64


def test_same_seed_same_keys_for_every_model():
  a = passkey.make_examples(Bytes(), 128, [0.0, 1.0], 3, seed=7, fmt='compact')
  b = passkey.make_examples(Bytes(), 128, [0.0, 1.0], 3, seed=7, fmt='compact')
  assert [e.key for e in a] == [e.key for e in b]
  assert len({e.key for e in a}) > 1


def _copy_apply(distance):
  """A 'model' that predicts token t + 1 as the token ``distance - 1`` positions before t + 1."""
  def apply_fn(tokens, positions, segment_ids):
    src = jnp.clip(jnp.arange(tokens.shape[1]) + 1 - distance, 0, tokens.shape[1] - 1)
    return jax.nn.one_hot(tokens[:, src], VOCAB) * 10.0
  return apply_fn


def test_scoring_on_planted_examples():
  tok = Bytes()
  examples = passkey.make_examples(tok, 128, [0.0, 1.0], 4, seed=0, fmt='compact')
  # At depth 1 the key's digits sit exactly len(needle tail + question) + 5 before the answer's.
  distance = len('. ') + len('The pass key is ') + 5
  correct, digits = passkey.score_examples(_copy_apply(distance), examples, batch_size=3)
  np.testing.assert_array_equal(correct, [False] * 4 + [True] * 4)
  np.testing.assert_array_equal(digits[4:], 5)
  assert np.all(digits[:4] < 5)
  records = passkey.passkey_accuracy(_copy_apply(distance), tok, length=128, depths=[0.0, 1.0],
                                     trials=4, fmt='compact')
  assert [r['accuracy'] for r in records] == [0.0, 1.0]
  assert records[1]['digit_accuracy'] == 1.0 and records[1]['correct'] == 4


def test_one_wrong_digit_makes_the_example_wrong():
  examples = passkey.make_examples(Bytes(), 96, [0.5], 2, fmt='compact')
  answer_start = examples[0].answer_start

  def oracle_but_one(tokens, positions, segment_ids):
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    wrong = jnp.where(jnp.arange(tokens.shape[1]) == answer_start + 1, nxt + 1, nxt)  # 3rd digit
    return jax.nn.one_hot(wrong, VOCAB)
  correct, digits = passkey.score_examples(oracle_but_one, examples)
  np.testing.assert_array_equal(correct, False)
  np.testing.assert_array_equal(digits, 4)


def position_oracle(max_position):
  """A 'model' that ranks the true next token first at index t only when it is given position
  min(t, max_position) (t itself for None), and the token after it otherwise: it answers a passkey
  correctly exactly when its positions are clamped as promised, no more and no less."""
  def apply_fn(tokens, positions, segment_ids):
    t = jnp.arange(tokens.shape[1])
    expected = t if max_position is None else jnp.minimum(t, max_position)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    return jax.nn.one_hot(jnp.where(positions == expected[None], nxt, (nxt + 1) % VOCAB), VOCAB)
  return apply_fn


def test_scoring_clamps_positions_at_max_position():
  """The answer (tokens 91–95 of 96) sits past position 63: only max_position=63 gives the oracle
  of a 64-row table the positions it expects; none, or one off either way, gets no digit right."""
  examples = passkey.make_examples(Bytes(), 96, [0.0, 1.0], 2, fmt='compact')
  correct, digits = passkey.score_examples(position_oracle(63), examples, batch_size=3,
                                           max_position=63)
  assert correct.all() and (digits == 5).all()
  for wrong in (None, 62, 64):
    correct, digits = passkey.score_examples(position_oracle(63), examples, batch_size=3,
                                             max_position=wrong)
    assert not correct.any() and not digits.any(), wrong
  correct, digits = passkey.score_examples(position_oracle(None), examples, batch_size=3)
  assert correct.all() and (digits == 5).all()


def test_mix_passkey_replaces_a_fraction_of_rows():
  tok = Bytes()
  batch = np.zeros((64, 64), np.int32)
  mixed, replaced = passkey.mix_passkey(batch, np.random.default_rng(0), 0.25, tok, bos_id=1)
  assert 5 < replaced.sum() < 30
  np.testing.assert_array_equal(mixed[~replaced], 0)
  for row in mixed[replaced]:
    assert row[0] == 1
    text = tok.decode(row[1:])
    key = text[-5:]
    assert key.isdigit() and f'The pass key is {key}. ' in text
  none, replaced = passkey.mix_passkey(batch, np.random.default_rng(0), 0.0, tok)
  assert not replaced.any() and np.array_equal(none, batch)


def test_config_formats_agree_with_the_registry():
  for fmt in passkey.FORMATS:
    assert EvalConfig(passkey_format=fmt).passkey_format == fmt
  with pytest.raises(ConfigError, match='eval.passkey_format'):
    EvalConfig(passkey_format='other')


class _Rows:
  """A checkpointable iterator of training batches, like the grain one."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    rng = np.random.default_rng(self.i)
    inputs = rng.integers(3, VOCAB, size=(16, 63)).astype(np.int32)
    return dict(inputs=inputs, targets=np.roll(inputs, -1, axis=1),
                positions=np.tile(np.arange(63) % 20, (16, 1)).astype(np.int32),
                segment_ids=np.tile(np.arange(63) // 20 + 1, (16, 1)).astype(np.int32),
                weights=np.ones((16, 63), np.float32))

  def get_state(self):
    return {'i': self.i}

  def set_state(self, state):
    self.i = state['i']


def test_passkey_mix_iterator_is_deterministic_and_resumable():
  tok = Bytes()
  mixed = passkey.PasskeyMix(_Rows(), tok, 0.5, bos_id=1, seed=3)
  first = next(mixed)
  state = mixed.get_state()
  second = next(mixed)
  mixed.set_state(state)
  np.testing.assert_array_equal(next(mixed)['inputs'], second['inputs'])
  replaced = first['segment_ids'][:, -1] == 1          # one document spans the whole row
  assert 0 < replaced.sum() < 16
  for i in np.flatnonzero(replaced):
    row = np.concatenate([first['inputs'][i], first['targets'][i, -1:]])
    np.testing.assert_array_equal(first['targets'][i, :-1], first['inputs'][i, 1:])
    text = tok.decode(row[1:])
    assert row[0] == 1 and text[-5:].isdigit() and f'The pass key is {text[-5:]}. ' in text
    np.testing.assert_array_equal(first['positions'][i], np.arange(63))
    assert first['weights'][i].min() == 1
  again = passkey.PasskeyMix(_Rows(), tok, 0.5, bos_id=1, seed=3)
  np.testing.assert_array_equal(next(again)['inputs'], first['inputs'])


def test_generation_recovers_exactly_what_greedy_teacher_forcing_accepts(make_params):
  """On a random model, examples whose answer is the model's own greedy continuation are correct
  in both modes; changing the last answer token makes both wrong, with 4 of 5 tokens matched."""
  from lcr.config import ModelConfig
  from lcr.decode import engine
  from lcr.config import DecodeConfig
  from lcr.model import TransformerLM
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=2, pos='rope',
                    attention_backend='xla')
  params = make_params(cfg, seed=5)
  planted = passkey.make_examples(Bytes(), 80, [0.0, 1.0], 2, seed=3, fmt='compact')
  prompts = [e.tokens[:e.answer_start] for e in planted]
  greedy = engine.generate(params, cfg, DecodeConfig(max_new_tokens=5), prompts).tokens
  own = [passkey.PasskeyExample(np.r_[p, g].astype(np.int32), len(p), 0, 0.0)
         for p, g in zip(prompts, greedy)]
  wrong = [dataclasses.replace(e, tokens=e.tokens.copy()) for e in own]
  for e in wrong:
    e.tokens[-1] = (e.tokens[-1] + 1) % VOCAB
  apply = lambda t, p, s: TransformerLM(cfg).apply({'params': params}, t, p, s)
  for examples, want_correct, want_digits in ((own, True, 5), (wrong, False, 4)):
    forced, forced_digits = passkey.score_examples(apply, examples, batch_size=4)
    generated, generated_digits = passkey.generate_keys(params, cfg, examples, batch_size=4)
    assert forced.tolist() == generated.tolist() == [want_correct] * 4
    assert forced_digits.tolist() == generated_digits.tolist() == [want_digits] * 4


def test_passkey_modes_are_validated():
  with pytest.raises(ConfigError, match='eval.passkey_modes'):
    EvalConfig(passkey_modes=('sampled',))
