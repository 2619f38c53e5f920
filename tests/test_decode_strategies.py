"""Decoding strategies against NumPy restatements, hand-built logits and exhaustive enumeration."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr.config import ConfigError, DecodeConfig, ModelConfig, from_config_dict
from lcr.decode import beam, engine, sampling
from conftest import random_params as init

# ----------------------------------------------------------------------------------------------
# Temperature, top-k, top-p: the masks against NumPy.


def numpy_keep(logits, temperature=1.0, top_k=0, top_p=1.0, min_keep=1):
  """Which tokens survive, restated in float64: top-k keeps ties at the k-th value; the nucleus is
  the most probable tokens while the mass before each is below p, closed under ties."""
  x = np.asarray(logits, np.float64) / temperature
  keep = np.ones_like(x, bool)
  if 0 < top_k < len(x):
    k = max(top_k, min_keep)
    keep &= x >= np.sort(x)[::-1][min(k, len(x)) - 1]
  if top_p < 1.0:
    z = np.where(keep, x, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind='stable')
    before = np.cumsum(p[order]) - p[order]
    kept = [i for r, i in enumerate(order) if before[r] < top_p - 1e-9 or r < min_keep]
    keep &= p >= min(p[kept])
  return keep


def jax_keep(logits, **kw):
  warped = sampling.warp(jnp.asarray([logits], jnp.float32), **kw)[0]
  return np.isfinite(np.asarray(warped))


@pytest.mark.parametrize('logits,kw,want', [
    ([3.0, 2.0, 2.0, 2.0, 1.0], dict(top_k=2), [1, 1, 1, 1, 0]),                 # ties at the k-th
    (np.log([0.5, 0.25, 0.125, 0.125]), dict(top_p=0.75), [1, 1, 0, 0]),         # mass exactly p
    (np.log([0.4, 0.2, 0.2, 0.2]), dict(top_p=0.5), [1, 1, 1, 1]),                # ties at the cut
    (np.log([0.1, 0.6, 0.3]), dict(top_p=1.0), [1, 1, 1]),                         # p = 1
    ([0.3, -1.0, 2.0], dict(top_k=3), [1, 1, 1]),                                  # k = V
    ([0.3, -1.0, 2.0], dict(top_k=9), [1, 1, 1]),                                  # k > V
    (np.log([0.7, 0.2, 0.1]), dict(top_p=0.01, min_tokens_to_keep=2), [1, 1, 0]),
    ([1.0, 5.0, 3.0, 2.0], dict(top_k=1, min_tokens_to_keep=3), [0, 1, 1, 1]),
])
def test_warpers_keep_what_the_definitions_say(logits, kw, want):
  assert jax_keep(logits, **kw).tolist() == [bool(w) for w in want]
  assert numpy_keep(logits, **{'top_k': 0, **{k.replace('min_tokens_to_keep', 'min_keep'): v
                                              for k, v in kw.items()}}).tolist() == [bool(w) for w in want]


def test_warpers_match_numpy_on_random_logits():
  rng = np.random.default_rng(0)
  for _ in range(40):
    v = 12
    logits = rng.normal(size=v) * rng.uniform(0.5, 4)
    kw = dict(temperature=float(rng.uniform(0.3, 2)), top_k=int(rng.integers(0, v + 2)),
              top_p=float(rng.choice([1.0, rng.uniform(0.05, 1)])), min_keep=int(rng.integers(1, 4)))
    got = jax_keep(logits, temperature=kw['temperature'], top_k=kw['top_k'], top_p=kw['top_p'],
                   min_tokens_to_keep=kw['min_keep'])
    assert got.tolist() == numpy_keep(logits, **kw).tolist(), kw


def test_temperature_divides_the_logits_before_top_k():
  logits = jnp.asarray([[2.0, 1.0, -1.0]])
  np.testing.assert_allclose(sampling.warp(logits, temperature=0.5), [[4.0, 2.0, -2.0]])


# χ² critical values at significance 0.001, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}


def test_20k_samples_follow_the_renormalised_warped_distribution():
  logits = np.log([0.22, 0.18, 0.15, 0.12, 0.1, 0.08, 0.07, 0.05, 0.03])
  kw = dict(temperature=0.8, top_k=7, top_p=0.9)
  keep = numpy_keep(logits, **kw)
  target = np.where(keep, np.exp(logits / 0.8), 0.0)
  target /= target.sum()
  n = 20_000
  draw = jax.jit(lambda rows: sampling.sample(
      sampling.warp(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits))), **kw),
      sampling.row_keys(7, rows, jnp.zeros_like(rows))))
  samples = np.asarray(draw(jnp.arange(n, dtype=jnp.int32)))
  counts = np.bincount(samples, minlength=len(logits))
  assert np.all(counts[~keep] == 0)
  expected = n * target[keep]
  chi2 = float(np.sum((counts[keep] - expected) ** 2 / expected))
  assert chi2 < CHI2_999[int(keep.sum()) - 1], (counts, expected)


# ----------------------------------------------------------------------------------------------
# The decoding loop on a real model.

TINY = dict(vocab_size=23, num_layers=2, d_model=24, num_heads=6, num_kv_heads=2, max_len=128,
            pos='rope', attention_backend='xla')
PROMPTS = [np.array([1, 5, 9, 4]), np.array([1, 7]), np.array([1, 3, 3, 8, 12, 6, 2, 5])]


@pytest.fixture(scope='module')
def tiny():
  cfg = ModelConfig(**TINY)
  return cfg, init(cfg, seed=11)


@pytest.mark.parametrize('attention', [{}, dict(attention='sliding', window=6)])
def test_greedy_with_the_cache_equals_greedy_with_full_forwards(tiny, attention):
  """32 tokens (past 4 windows for the ring cache), prompts of three lengths in one batch."""
  cfg, params = tiny
  cfg = dataclasses.replace(cfg, **attention)
  decode = DecodeConfig(max_new_tokens=32)
  cached = engine.generate(params, cfg, decode, PROMPTS)
  full = engine.generate(params, cfg, dataclasses.replace(decode, use_cache=False), PROMPTS)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  assert cached.lengths.tolist() == [32, 32, 32]
  # And row by row, a plain argmax over full forwards of the growing sequence.
  apply = jax.jit(engine.TransformerLM(cfg).apply)
  seq = np.concatenate([PROMPTS[1], cached.tokens[1]])
  logits = np.asarray(apply({'params': params}, jnp.asarray(seq[None])))[0]
  np.testing.assert_array_equal(np.argmax(logits[len(PROMPTS[1]) - 1:-1], -1), cached.tokens[1])


@pytest.mark.parametrize('attention,capacity', [
    (dict(attention='sliding', window=6), 6), (dict(attention='sinks', window=5, sink_tokens=2), 7),
    ({}, None)])
def test_ring_and_sink_caches_do_not_grow_with_the_generated_length(tiny, attention, capacity):
  cfg, params = tiny
  cfg = dataclasses.replace(cfg, **attention)
  shapes = {}
  for new in (24, 400):
    stepper = engine.Stepper(cfg, DecodeConfig(max_new_tokens=new), prompt_len=4)
    _, state = jax.eval_shape(stepper.prefill, params, jnp.zeros((3, 4), jnp.int32),
                              jnp.full((3,), 4, jnp.int32))
    shapes[new] = {k: v.value.shape for k, v in state['layer_0']['attention']['cache'].items()}
  if capacity is None:   # the full cache holds every position
    assert shapes[24]['key'][2] == 28 and shapes[400]['key'][2] == 404
  else:
    assert shapes[24] == shapes[400]
    assert shapes[400] == {'key': (3, 2, capacity, 4), 'value': (3, 2, capacity, 4)}
  out = engine.generate(params, cfg, DecodeConfig(max_new_tokens=4 * (capacity or 6)), PROMPTS)
  assert out.lengths.tolist() == [4 * (capacity or 6)] * 3


def test_rows_end_at_eos_or_when_the_host_says_so(tiny):
  cfg, params = tiny
  free = engine.generate(params, cfg, DecodeConfig(max_new_tokens=12), PROMPTS)
  eos = int(free.tokens[0, 3])             # pretend row 0's fourth token is EOS
  first = [int(np.argmax(row == eos)) if eos in row else 12 for row in free.tokens]
  ended = engine.generate(params, cfg, DecodeConfig(max_new_tokens=12), PROMPTS, eos_id=eos)
  for b, at in enumerate(first):
    length = min(at + 1, 12)
    assert ended.lengths[b] == length
    np.testing.assert_array_equal(ended.tokens[b, :length], free.tokens[b, :length])
    assert np.all(ended.tokens[b, length:] == engine.PAD_ID)
  calls = []

  def stop_row_1_after_two(tokens, index, emitted):
    calls.append(index.copy())
    return (np.arange(3) == 1) & (index >= 1) & emitted
  stopped = engine.generate(params, cfg, DecodeConfig(max_new_tokens=12), PROMPTS,
                            on_step=stop_row_1_after_two)
  assert stopped.lengths.tolist() == [12, 2, 12] and calls


def test_sampling_on_eight_devices_equals_one_device(tiny):
  """The batch split over data (4) and the heads over tensor (2): same text for the same seed."""
  from lcr import sharding
  from lcr.config import MeshConfig
  cfg, params = tiny
  decode = DecodeConfig(strategy='sample', temperature=0.9, top_p=0.95, seed=3, max_new_tokens=10)
  prompts = PROMPTS + [np.array([1, 2, 3]), np.array([1]), np.array([1, 9] * 3), np.array([4, 4]),
                       np.array([1, 17, 5])]
  one = engine.generate(params, cfg, decode, prompts)
  mesh_cfg = MeshConfig(shape=(4, 1, 2))
  mesh = sharding.make_mesh(mesh_cfg)
  eight = engine.generate(params, cfg, decode, prompts, mesh=mesh, mesh_cfg=mesh_cfg)
  np.testing.assert_array_equal(one.tokens, eight.tokens)
  other_seed = engine.generate(params, cfg, dataclasses.replace(decode, seed=4), prompts)
  assert not np.array_equal(one.tokens, other_seed.tokens)


def test_the_cache_is_sharded_like_the_activations(tiny):
  """Under the mesh rules the prefilled cache splits its batch over data and its K/V heads over
  tensor, as the model's logical axes say."""
  import flax.linen as nn
  from jax.sharding import PartitionSpec as P
  from lcr import sharding
  from lcr.config import MeshConfig
  cfg, params = tiny
  mesh_cfg = MeshConfig(shape=(4, 1, 2))
  mesh = sharding.make_mesh(mesh_cfg)
  stepper = engine.Stepper(cfg, DecodeConfig(max_new_tokens=4), prompt_len=6)

  def prefill(params, prompt, lengths):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(mesh_cfg.active_rules):
      return stepper.prefill(params, prompt, lengths)
  batch = sharding.batch_sharding(mesh, mesh_cfg)
  rows = jax.sharding.NamedSharding(mesh, P(batch.spec[0]))
  jitted = jax.jit(prefill, in_shardings=(engine.param_shardings(cfg, mesh, mesh_cfg), batch, rows))
  _, state = jitted(params, jnp.ones((8, 6), jnp.int32), jnp.full((8,), 6, jnp.int32))
  for name in ('key', 'value'):
    spec = state['layer_1']['attention']['cache'][name].value.sharding.spec
    assert spec[:2] == (('data', 'fsdp'), 'tensor') or spec[:2] == ('data', 'tensor'), spec


# ----------------------------------------------------------------------------------------------
# Beam search.


def test_one_beam_without_length_penalty_is_greedy(tiny):
  cfg, params = tiny
  greedy = engine.generate(params, cfg, DecodeConfig(max_new_tokens=9), PROMPTS, eos_id=7)
  beams = beam.beam_search(params, cfg, DecodeConfig(strategy='beam', num_beams=1,
                                                     length_penalty=0.0, max_new_tokens=9),
                           PROMPTS, eos_id=7)
  np.testing.assert_array_equal(beams.lengths[:, 0], greedy.lengths)
  for b in range(3):
    np.testing.assert_array_equal(beams.best(b), greedy.row(b))


def test_enough_beams_find_the_best_sequence_of_an_exhaustive_search():
  """Vocabulary 6, up to 3 new tokens: every hypothesis scored by log P / lp(|Y|)."""
  cfg = ModelConfig(**{**TINY, 'vocab_size': 6, 'num_layers': 1})
  params = init(cfg, seed=12)
  eos, n_new, alpha = 2, 3, 0.8
  prompts = [np.array([1, 4, 3]), np.array([5])]
  found = beam.beam_search(params, cfg, DecodeConfig(strategy='beam', num_beams=36,
                                                     length_penalty=alpha, max_new_tokens=n_new),
                           prompts, eos_id=eos)
  apply = jax.jit(engine.TransformerLM(cfg).apply)
  for b, prompt in enumerate(prompts):
    hyps = [seq for length in range(1, n_new + 1) for seq in itertools.product(range(6), repeat=length)
            if eos not in seq[:-1] and (length == n_new or seq[-1] == eos)]
    rows = np.asarray([list(prompt) + list(seq) + [0] * (n_new - len(seq)) for seq in hyps])
    logp = np.asarray(jax.nn.log_softmax(apply({'params': params}, jnp.asarray(rows)), -1))
    scores = [sum(logp[i, len(prompt) - 1 + j, tok] for j, tok in enumerate(seq))
              / ((5 + len(seq)) / 6) ** alpha for i, seq in enumerate(hyps)]
    order = np.argsort(scores)[::-1]
    assert tuple(found.best(b)) == hyps[order[0]]
    np.testing.assert_allclose(found.scores[b, :3], np.asarray(scores)[order[:3]], rtol=1e-5)


class TableStepper:
  """Hand-built logits: the next-token distribution is a function of the token just fed."""

  def __init__(self, table):
    self.log_table = jnp.log(jnp.asarray(table, jnp.float32))
    self.prefill_len = 1

  def prefill(self, params, prompt, lengths):
    return self.log_table[prompt[:, 0]], jnp.zeros((prompt.shape[0], 1))

  def step(self, params, state, tokens, positions):
    return self.log_table[tokens], state


def test_beam_search_keeps_finished_hypotheses_and_beats_greedy_on_hand_built_logits():
  """Start token 3: EOS (1) with 0.45, 'a' (2) with 0.4, 'b' (3) with 0.15. After 'a', EOS is
  near certain. Greedy stops at once (log 0.45); beam search finds [a, EOS]:
  (log 0.4 + log 0.98) / (7/6)^2 = −0.6870 > −0.7985."""
  eps = 1e-4
  table = [[0.25] * 4, [0.25] * 4, [eps, 0.98, eps, 0.02 - 2 * eps], [eps, 0.45, 0.4, 0.15 - eps]]
  seqs, lens, scores, raw = jax.jit(lambda: beam.search_loop(
      TableStepper(table), None, jnp.asarray([[3]]), jnp.asarray([1]), n=2, max_new=4,
      alpha=2.0, eos_id=1))()
  assert np.asarray(lens)[0].tolist() == [2, 1]
  assert np.asarray(seqs)[0, 0, :2].tolist() == [2, 1] and int(seqs[0, 1, 0]) == 1
  np.testing.assert_allclose(np.asarray(scores)[0], [(np.log(0.4) + np.log(0.98)) / (7 / 6) ** 2,
                                                     np.log(0.45)], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(raw)[0, 1], np.log(0.45), rtol=1e-5)


def test_beam_search_goes_on_while_a_live_beam_can_still_win():
  """One beam: [EOS] finishes first (log 0.55 = −0.598), so n hypotheses are finished, but the
  live beam [a] (log 0.45) may still reach −0.799 / lp(4) = −0.355 with α = 2; it goes on and
  [a, EOS] wins: (log 0.45 + log 0.999) / (7/6)^2 = −0.587."""
  eps = 1e-6
  table = [[0.25] * 4, [0.25] * 4, [eps, 0.999, eps, 0.001 - 2 * eps], [eps, 0.55, 0.45 - 2 * eps, eps]]
  seqs, lens, scores, _ = jax.jit(lambda: beam.search_loop(
      TableStepper(table), None, jnp.asarray([[3]]), jnp.asarray([1]), n=1, max_new=4,
      alpha=2.0, eos_id=1))()
  assert int(lens[0, 0]) == 2 and np.asarray(seqs)[0, 0, :2].tolist() == [2, 1]
  np.testing.assert_allclose(float(scores[0, 0]), (np.log(0.45 - 2 * eps) + np.log(0.999)) / (7 / 6) ** 2,
                             rtol=1e-5)


def test_beam_search_stops_once_no_live_beam_can_win():
  """After [EOS] (log 0.9) every continuation has log-probability ≤ log 0.1 < log 0.9 even at the
  most favourable length: the search ends after one step with the EOS hypothesis best."""
  table = [[0.25] * 4, [0.25] * 4, [0.25] * 4, [1e-6, 0.9, 0.1 - 2e-6, 1e-6]]
  seqs, lens, scores, _ = jax.jit(lambda: beam.search_loop(
      TableStepper(table), None, jnp.asarray([[3]]), jnp.asarray([1]), n=1, max_new=50,
      alpha=0.6, eos_id=1))()
  assert int(lens[0, 0]) == 1 and int(seqs[0, 0, 0]) == 1
  np.testing.assert_allclose(float(scores[0, 0]), np.log(0.9), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('field,value,match', [
    ('strategy', 'nucleus', 'decode.strategy'), ('top_p', 0.0, 'decode.top_p'),
    ('top_p', 1.5, 'decode.top_p'), ('num_beams', 0, 'decode.num_beams'),
    ('temperature', 0.0, 'decode.temperature'), ('max_new_tokens', 0, 'decode.max_new_tokens'),
    ('min_tokens_to_keep', 0, 'decode.min_tokens_to_keep'), ('top_k', -1, 'decode.top_k')])
def test_bad_decode_fields_fail_naming_the_field(field, value, match):
  with pytest.raises(ConfigError, match=match):
    from_config_dict({'decode': {field: value}})


def test_bad_prompts_and_lengths_fail_before_compiling(tiny):
  cfg, params = tiny
  with pytest.raises(ConfigError, match='empty prompt'):
    engine.generate(params, cfg, DecodeConfig(), [np.array([1, 2]), np.array([], np.int32)])
  learned = dataclasses.replace(cfg, pos='learned', max_len=16)
  with pytest.raises(ConfigError, match='decode.max_new_tokens=10.*model.max_len=16'):
    engine.generate(init(learned), learned, DecodeConfig(max_new_tokens=10), [np.arange(8)])
