"""Perplexity protocols, windowing, bits per byte and RoPE evaluation configs of lcr.evaluate."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import evaluate
from lcr.config import ConfigError, EvalConfig, ModelConfig
from lcr.model import TransformerLM
from test_passkey import Bytes, position_oracle

VOCAB = 11


def _positional_apply(tokens, positions, segment_ids):
  """Logits that depend on the input token and its position: z_v = sin(v·(x + 1)) + cos(v·p) / 2."""
  v = jnp.arange(VOCAB, dtype=jnp.float32)[None, None]
  x = tokens.astype(jnp.float32)[..., None]
  p = positions.astype(jnp.float32)[..., None]
  return jnp.sin(v * (x + 1)) + jnp.cos(v * p) / 2 + 0.0 * segment_ids[..., None]


def _reference_logits(x, p):
  v = np.arange(VOCAB, dtype=np.float64)
  return np.sin(v * (x + 1)) + np.cos(v * p) / 2


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_nonoverlapping_equals_hand_computed_nll_with_partial_window():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=42).astype(np.int32)    # 41 targets: 5 windows of 8 + 1
  stream = evaluate.make_stream(tokens)
  scores = evaluate.score_stream(_positional_apply, stream, eval_len=8, batch_size=2, train_len=8)
  nll = []
  for j in range(41):   # target j = token j + 1, predicted at position j mod 8 of its window
    logp = _log_softmax(_reference_logits(tokens[j], j % 8))
    nll.append(-logp[tokens[j + 1]])
  assert scores.tokens == 41
  np.testing.assert_allclose(scores.nll, np.sum(nll), rtol=1e-5)
  np.testing.assert_allclose(scores.ppl, math.exp(np.mean(nll)), rtol=1e-5)
  np.testing.assert_array_equal(scores.position_count, [6] + [5] * 7)


def test_bits_per_byte_uses_byte_lengths_of_scored_targets():
  tokens = np.arange(21, dtype=np.int32) % VOCAB
  byte_lengths = np.arange(VOCAB) % 3             # ids 0, 3, 6, 9 are zero-byte special tokens
  scores = evaluate.score_stream(_positional_apply, evaluate.make_stream(tokens), eval_len=8,
                                 byte_lengths=byte_lengths)
  assert scores.bytes == int(byte_lengths[tokens[1:]].sum())
  np.testing.assert_allclose(scores.bpb, scores.nll / math.log(2) / scores.bytes)


@pytest.mark.parametrize('protocol,eval_len,stride,num_targets', [
    ('nonoverlapping', 8, 0, 41), ('nonoverlapping', 16, 0, 5), ('sliding', 8, 3, 41),
    ('sliding', 8, 8, 40), ('sliding', 8, 1, 20), ('sliding', 16, 4, 9), ('sliding', 8, 5, 13)])
def test_every_target_scored_exactly_once(protocol, eval_len, stride, num_targets):
  stream = evaluate.make_stream(np.arange(num_targets + 1, dtype=np.int32))
  plan = evaluate.plan_windows(num_targets, eval_len, protocol, stride)
  counts = np.zeros(num_targets + 1)
  for b in evaluate.iterate_batches(stream, plan, eval_len, 3, num_targets):
    np.add.at(counts, b['targets'], b['weights'])
    # Each target's context is its own window: inputs are the stream tokens just before it.
    np.testing.assert_array_equal(b['targets'][b['weights'] > 0], b['inputs'][b['weights'] > 0] + 1)
  np.testing.assert_array_equal(counts[1:], 1.0)
  assert counts[0] == 0
  if protocol == 'sliding':  # every scored target after the first window has >= L - S + 1 inputs
    for start, end, score_from in plan[1:]:
      assert score_from - start >= eval_len - stride and end - start == eval_len


def test_sliding_with_stride_equal_to_length_equals_nonoverlapping():
  """An invariant: stride L makes the sliding windows the non-overlapping ones."""
  rng = np.random.default_rng(1)
  stream = evaluate.make_stream(rng.integers(0, VOCAB, size=50).astype(np.int32))
  a = evaluate.score_stream(_positional_apply, stream, eval_len=16, protocol='nonoverlapping')
  b = evaluate.score_stream(_positional_apply, stream, eval_len=16, protocol='sliding', stride=16)
  np.testing.assert_allclose(a.nll, b.nll, rtol=1e-6)
  np.testing.assert_array_equal(a.position_count, b.position_count)


def _tiny_model(pos='rope'):
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2, pos=pos, max_len=64)
  model = TransformerLM(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return jax.jit(model.apply), params


def _forward(model_apply, params, window):
  t = jnp.asarray(window[None], jnp.int32)
  logits = model_apply(params, t, jnp.arange(len(window))[None], jnp.ones_like(t))
  return _log_softmax(np.asarray(logits[0], np.float64))


def test_tiny_transformer_nonoverlapping_matches_per_window_forward():
  model, params = _tiny_model('alibi')
  tokens = np.random.default_rng(2).integers(0, VOCAB, size=38).astype(np.int32)
  apply_fn = lambda t, p, s: model(params, t, p, s)
  scores = evaluate.score_stream(apply_fn, evaluate.make_stream(tokens), eval_len=16, batch_size=4,
                                 train_len=8)
  nll = []
  for start in range(0, 37, 16):   # windows [0,16), [16,32), [32,37): the last one is partial
    window = tokens[start:min(start + 16, 37) + 1]
    logp = _forward(model, params, window[:-1])
    nll += [-logp[i, window[i + 1]] for i in range(len(window) - 1)]
  assert scores.tokens == 37
  np.testing.assert_allclose(scores.loss, np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(scores.ppl, math.exp(np.mean(nll)), rtol=1e-5)


def test_tiny_transformer_sliding_stride_one_gives_every_target_full_context():
  model, params = _tiny_model('rope')
  tokens = np.random.default_rng(3).integers(0, VOCAB, size=20).astype(np.int32)
  apply_fn = lambda t, p, s: model(params, t, p, s)
  scores = evaluate.score_stream(apply_fn, evaluate.make_stream(tokens), eval_len=8,
                                 protocol='sliding', stride=1, batch_size=4)
  first = _forward(model, params, tokens[:8])
  nll = [-first[j, tokens[j + 1]] for j in range(8)]
  for j in range(8, 19):         # target j sees exactly the 8 tokens ending at j
    nll.append(-_forward(model, params, tokens[j - 7:j + 1])[-1, tokens[j + 1]])
  np.testing.assert_allclose(scores.nll, np.sum(nll), rtol=1e-5)


def test_max_tokens_scores_a_prefix_of_at_least_one_window():
  stream = evaluate.make_stream(np.arange(100, dtype=np.int32) % VOCAB)
  assert evaluate.score_stream(_positional_apply, stream, eval_len=8, max_tokens=20).tokens == 20
  assert evaluate.score_stream(_positional_apply, stream, eval_len=32, max_tokens=20).tokens == 32


def test_documents_are_concatenated_with_separators_and_nothing_is_lost():
  docs = [np.array([1, 2], np.int32), np.array([3], np.int32), np.array([4, 5, 6, 7], np.int32)]
  stream = evaluate.make_stream(docs, separator=0)
  np.testing.assert_array_equal(stream.tokens, [0, 1, 2, 0, 3, 0, 4, 5, 6, 7])
  np.testing.assert_array_equal(stream.documents, [1, 1, 1, 2, 2, 3, 3, 3, 3, 3])
  scores = evaluate.score_stream(_positional_apply, stream, eval_len=4)
  assert scores.tokens == 9
  # Without attention across documents, positions restart at each document start and each window.
  plan = evaluate.plan_windows(9, 4, 'nonoverlapping')
  batch = next(evaluate.iterate_batches(stream, plan, 4, 3, 9, attend_across_documents=False))
  np.testing.assert_array_equal(batch['positions'][:3], [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 2, 3]])
  np.testing.assert_array_equal(batch['segment_ids'][:2], [[1, 1, 1, 2], [2, 3, 3, 3]])


def test_max_position_clamps_positions_explicitly():
  stream = evaluate.make_stream(np.arange(17, dtype=np.int32))
  plan = evaluate.plan_windows(16, 16, 'nonoverlapping')
  batch = next(evaluate.iterate_batches(stream, plan, 16, 1, 16, max_position=7))
  np.testing.assert_array_equal(batch['positions'][0], np.minimum(np.arange(16), 7))


def test_windows_per_batch_keeps_tokens_per_batch_bounded():
  assert evaluate.windows_per_batch(8, 64, 64) == 8
  assert evaluate.windows_per_batch(8, 64, 256) == 2
  assert evaluate.windows_per_batch(8, 64, 2048) == 1


def test_scaled_config_factor_and_identity_cases():
  cfg = ModelConfig(pos='rope')
  ntk = evaluate.scaled_config(cfg, 'ntk', 256, 64)
  assert (ntk.rope_scaling, ntk.rope_factor, ntk.rope_original_length) == ('ntk', 4.0, 64)
  assert evaluate.scaled_config(cfg, 'yarn', 256, 64, factor=8).rope_factor == 8.0
  for scaling in ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn'):
    assert evaluate.scaled_config(cfg, scaling, 64, 64) == cfg       # factor 1: nothing changes
    assert evaluate.scaled_config(cfg, scaling, 32, 64) == cfg       # never a factor below 1
  assert evaluate.scaled_config(cfg, 'linear', 64, 64, factor=2).rope_factor == 2.0
  dyn = evaluate.scaled_config(cfg, 'dynamic_ntk', 128, 64)
  assert dataclasses.replace(dyn, rope_scaling='none', rope_factor=1.0, rope_original_length=0) == cfg
  with pytest.raises(ConfigError, match='rope_scalings'):
    evaluate.scaled_config(ModelConfig(pos='alibi'), 'ntk', 128, 64)


def test_learned_position_policy_is_explicit():
  cfg = ModelConfig(pos='learned', max_len=256)
  assert evaluate.learned_position_limit(cfg, EvalConfig(learned_positions='clamp'), 64, 256) == 63
  assert evaluate.learned_position_limit(cfg, EvalConfig(learned_positions='untrained'), 64,
                                         256) is None
  assert evaluate.learned_position_limit(ModelConfig(pos='alibi'), EvalConfig(), 64, 4096) is None
  with pytest.raises(ConfigError, match='model.max_len=256'):
    evaluate.learned_position_limit(cfg, EvalConfig(), 64, 512)


def test_evaluator_plans_scalings_for_rope_only_and_reuses_identical_configs(rope):
  eval_cfg = EvalConfig(multipliers=(1, 2), protocols=('nonoverlapping', 'sliding'),
                        rope_scalings=('none', 'ntk'), max_tokens=32, batch_size=2)
  rope_tasks = evaluate.plan_tasks(ModelConfig(pos='rope'), eval_cfg, 8)
  assert len(rope_tasks) == 2 * 2 * 2
  assert {t.stride for t in rope_tasks if t.protocol == 'sliding'} == {8}
  assert len(evaluate.plan_tasks(ModelConfig(pos='alibi'), eval_cfg, 8)) == 2 * 2
  cfg, params = rope
  evaluator = evaluate.Evaluator(params, cfg, eval_cfg, 8)
  stream = evaluate.make_stream(np.arange(60, dtype=np.int32) % VOCAB)
  at_l = [evaluator.perplexity(evaluate.Task(s, 'nonoverlapping', 8, 0), stream, None)
          for s in ('none', 'ntk')]
  assert at_l[0] is at_l[1]                               # factor 1: computed once
  # What a scaling computes at 2L: test_evaluator_ntk_is_rope_with_the_ntk_base.
  fields = evaluator.task_fields(evaluate.Task('ntk', 'nonoverlapping', 16, 0))
  assert fields['rope_factor'] == 2.0 and fields['learned_positions'] is None


# ----------------------------------------------------------------------------------------------
# The Evaluator's wiring: what it passes to score_stream and passkey scoring, against references
# computed here window by window from the model's logits (a model trained at L = 8).

L = 8


def _model(**fields):
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2, max_len=64, **fields)
  params = TransformerLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  return cfg, params


@pytest.fixture(scope='module')
def learned():
  return _model(pos='learned')


@pytest.fixture(scope='module')
def rope():
  return _model(pos='rope')


@functools.cache
def jitted_apply(cfg):
  return jax.jit(TransformerLM(cfg).apply)


def window_log_probs(cfg, params, windows, positions):
  """[W, T, V] float64 log-probabilities of ``TransformerLM(cfg)`` on each window [W, T]."""
  logits = jitted_apply(cfg)({'params': params}, jnp.asarray(windows, jnp.int32),
                             jnp.asarray(np.broadcast_to(positions, windows.shape)))
  return _log_softmax(np.asarray(logits, np.float64))


def nonoverlapping_nll(cfg, params, tokens, eval_len, positions):
  """Σ −log p(token j + 1) over windows [kL', (k+1)L') of a stream that fills them exactly."""
  windows = tokens[:-1].reshape(-1, eval_len)
  targets = tokens[1:].reshape(-1, eval_len)
  logp = window_log_probs(cfg, params, windows, positions)
  return -np.take_along_axis(logp, targets[..., None], -1).sum()


@pytest.mark.parametrize('policy', ['clamp', 'untrained'])
def test_evaluator_learned_positions_clamp_or_untrained(policy, learned):
  """Past L a learned table gives every position >= L row L − 1 ('clamp') or its own, untrained
  row ('untrained'): the Evaluator's NLL is the per-window NLL with exactly those positions."""
  cfg, params = learned
  tokens = np.random.default_rng(4).integers(0, VOCAB, size=2 * 16 + 1).astype(np.int32)
  evaluator = evaluate.Evaluator(params, cfg, EvalConfig(learned_positions=policy, batch_size=2), L)
  scores = evaluator.perplexity(evaluate.Task('none', 'nonoverlapping', 16, 0),
                                evaluate.make_stream(tokens), None)
  positions = {'clamp': np.minimum(np.arange(16), L - 1), 'untrained': np.arange(16)}
  want = {p: nonoverlapping_nll(cfg, params, tokens, 16, positions[p]) for p in positions}
  assert scores.tokens == 32
  np.testing.assert_allclose(scores.nll, want[policy], rtol=1e-5)
  assert abs(want['clamp'] - want['untrained']) > 1e-2     # the two policies really differ here


def sliding_nll(cfg, params, tokens, eval_len, stride):
  """Each target j (token j + 1) from the window the sliding protocol scores it in, by definition:
  j < L in window [0, L); else the window ending at e = L + kS with k = ⌊(j − L)/S⌋ + 1."""
  n = len(tokens) - 1
  starts = [0 if j < eval_len else (j - eval_len) // stride * stride + stride for j in range(n)]
  padded = np.concatenate([tokens, np.zeros(eval_len, np.int32)])   # causal: padding is unseen
  first = sorted(set(starts))
  windows = np.stack([padded[s:s + eval_len] for s in first])
  logp = window_log_probs(cfg, params, windows, np.arange(eval_len))
  return -sum(logp[first.index(s), j - s, tokens[j + 1]] for j, s in enumerate(starts))


def test_evaluator_sliding_stride_and_bits_per_byte_of_the_scored_targets(rope):
  """eval.stride = 3 reaches the windows, and bits per byte count the UTF-8 bytes of the scored
  targets, each once: here the first input (0 bytes) and the last target (4 bytes) differ."""
  cfg, params = rope
  eval_cfg = EvalConfig(lengths=(L,), protocols=('sliding',), stride=3, rope_scalings=('none',),
                        batch_size=2)
  [task] = evaluate.plan_tasks(cfg, eval_cfg, L)
  assert task == evaluate.Task('none', 'sliding', L, 3)
  tokens = np.random.default_rng(5).integers(1, VOCAB - 1, size=30).astype(np.int32)
  tokens[0], tokens[-1] = 0, VOCAB - 1
  byte_lengths = np.r_[0, np.random.default_rng(6).integers(1, 4, size=VOCAB - 2), 4]
  assert byte_lengths[tokens[1:]].sum() != byte_lengths[tokens[:-1]].sum()
  scores = evaluate.Evaluator(params, cfg, eval_cfg, L).perplexity(
      task, evaluate.make_stream(tokens), byte_lengths)
  want = sliding_nll(cfg, params, tokens, L, 3)
  assert scores.tokens == 29 and scores.bytes == byte_lengths[tokens[1:]].sum()
  np.testing.assert_allclose(scores.nll, want, rtol=1e-5)
  np.testing.assert_allclose(scores.bpb, want / math.log(2) / byte_lengths[tokens[1:]].sum(),
                             rtol=1e-5)
  assert abs(want - sliding_nll(cfg, params, tokens, L, L)) > 1e-2   # the stride matters here


@pytest.mark.parametrize('rope_factor', [0.0, 3.0])
def test_evaluator_ntk_is_rope_with_the_ntk_base(rope_factor, rope):
  """NTK-aware scaling (bloc97 2023) at eval_len 2L is plain RoPE with base · α^(d/(d−2)), where
  α = eval_len / L, or eval.rope_factor when set; d = head_dim = 8."""
  cfg, params = rope
  tokens = np.random.default_rng(7).integers(0, VOCAB, size=2 * 16 + 1).astype(np.int32)
  evaluator = evaluate.Evaluator(params, cfg, EvalConfig(rope_factor=rope_factor, batch_size=2), L)
  scores = evaluator.perplexity(evaluate.Task('ntk', 'nonoverlapping', 16, 0),
                                evaluate.make_stream(tokens), None)
  alpha = rope_factor or 16 / L
  ntk = dataclasses.replace(cfg, rope_base=10000.0 * alpha ** (8 / 6))
  want = nonoverlapping_nll(ntk, params, tokens, 16, np.arange(16))
  np.testing.assert_allclose(scores.nll, want, rtol=1e-5)
  assert abs(want - nonoverlapping_nll(cfg, params, tokens, 16, np.arange(16))) > 1e-3


class ProbedEvaluator(evaluate.Evaluator):
  """The Evaluator with test_passkey's position oracle for a model: its passkey accuracy is 1
  when the oracle gets the positions it expects and 0 otherwise (the answer lies past L)."""

  def __init__(self, model_cfg, eval_cfg, train_len, expects):
    super().__init__({}, model_cfg, eval_cfg, train_len)
    self.expects = expects

  def apply_fn(self, cfg):
    return position_oracle(self.expects)


@pytest.mark.parametrize('pos,policy,expects,accuracy', [
    ('learned', 'clamp', 31, 1.0), ('learned', 'clamp', None, 0.0),
    ('learned', 'untrained', None, 1.0), ('learned', 'untrained', 31, 0.0),
    ('rope', 'clamp', None, 1.0)])
def test_evaluator_passkey_positions_follow_the_learned_position_policy(pos, policy, expects,
                                                                        accuracy):
  cfg = ModelConfig(vocab_size=256, d_model=16, num_heads=2, pos=pos, max_len=64)
  eval_cfg = EvalConfig(learned_positions=policy, passkey_depths=(0.0, 1.0), passkey_trials=2,
                        passkey_format='compact')
  records = ProbedEvaluator(cfg, eval_cfg, 32, expects).passkey('none', 64, Bytes())
  assert [r['accuracy'] for r in records] == [accuracy] * 2
