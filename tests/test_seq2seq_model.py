"""The encoder-decoder against invariants and references computed independently.

* T5's bidirectional buckets against mesh-tensorflow's formula; bidirectional ALiBi is −m·|i − j|.
* The encoder sees every source token, the decoder only its past (every positional encoding).
* Cached decoding (the prefill computes the cross-attention keys and values once, then one token
  per step) gives the full forward's log-probabilities, for every cross-attention kind, with the
  pointer-generator, GQA, rows of different source and prompt lengths, past the training length.
* Packed rows give each example exactly what it gets alone (grain's packing, every kind).
* The pointer with p_gen → 0 outputs the copy distribution of the last layer's attention over the
  source tokens; hard monotonic attention in the model never moves backwards; decoding with
  expected monotonic alignments (``seq2seq.monotonic_decode``) is cached like the full forward.
* Every head's initial monotonic energy can reach both hard decisions (σ(e) > 0.99 and < 0.01).
"""

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import positional
from lcr.config import ModelConfig, from_config_dict
from lcr.seq2seq import arch as arch_lib
from lcr.seq2seq import data, tasks
from lcr.seq2seq.config import Seq2SeqConfig
from lcr.seq2seq.model import EncoderDecoder
from lcr.seq2seq.stepper import EncoderDecoderStepper, source_inputs
from lcr.config import DecodeConfig

V = tasks.VOCAB_SIZE


def reference_bucket(n, num_buckets, max_distance):
  """mesh-tensorflow _relative_position_bucket(bidirectional=True), n = query − key."""
  ret, half = 0, num_buckets // 2
  if n < 0:
    ret, n = half, -n
  exact = half // 2
  if n < exact:
    return ret + n
  val = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact))
  return ret + min(val, half - 1)


@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (8, 20)])
def test_t5_bidirectional_buckets_match_mesh_tensorflow(num_buckets, max_distance):
  n = np.arange(-400, 401)
  got = np.asarray(positional.t5_bucket(jnp.asarray(n)[None], jnp.zeros((1, 1), jnp.int32),
                                        num_buckets, max_distance, bidirectional=True))[0, :, 0]
  np.testing.assert_array_equal(got, [reference_bucket(int(x), num_buckets, max_distance) for x in n])


def test_bidirectional_alibi_is_symmetric():
  q, k = jnp.array([[0, 3, 7]]), jnp.array([[0, 2, 5, 9]])
  got = np.asarray(positional.alibi_bias(4, causal=False)(q, k))[0]
  slopes = positional.alibi_slopes(4)
  want = -slopes[:, None, None] * np.abs(np.array([0, 3, 7])[:, None] - np.array([0, 2, 5, 9]))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def config(pos='t5', kind='softmax', pointer=False, **model):
  cfg = ModelConfig(**{**dict(arch='encoder_decoder', vocab_size=V, num_layers=1, d_model=16,
                              num_heads=2, pos=pos, attention_backend='xla', max_len=48,
                              t5_max_distance=16), **model})
  return cfg, Seq2SeqConfig(cross_attention=kind, pointer=pointer, location_width=3)


def random_params(cfg, tips, seed=0, scale=0.3):
  model = EncoderDecoder(cfg, tips)
  z = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), z, z, z + 1, z, z, z + 1)['params'])
  rng = np.random.default_rng(seed)
  import flax.linen as nn
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype),
                      nn.meta.unbox(shapes))


@functools.lru_cache(maxsize=None)
def full_forward(cfg, tips, mode='hard'):
  model = EncoderDecoder(cfg, tips, mode=mode)

  def run(params, source, source_lengths, target):
    sp, ss = source_inputs(source, source_lengths)
    tp = jnp.broadcast_to(jnp.arange(target.shape[1]), target.shape)
    memory = model.apply({'params': params}, source, sp, ss, method=EncoderDecoder.encode)
    return memory.states, model.apply({'params': params}, source, sp, ss, target, tp, jnp.ones_like(target))
  return jax.jit(run)


# Every kind, every way an encoding enters (bias, rotary, absolute, none), the pointer, GQA, and
# two layers (the second reads the first's cached output) once.
CASES = [('t5', 'softmax', dict(pointer=True, num_layers=2)),
         ('rope', 'softmax', dict(num_heads=4, num_kv_heads=2)), ('alibi', 'location', {}),
         ('learned', 'monotonic', dict(pointer=True))]


def batch(seed=1, steps=14):
  rng = np.random.default_rng(seed)
  source = rng.integers(4, V, (2, 7)).astype(np.int32)
  source[1, 5:] = tasks.PAD_ID
  target = rng.integers(4, V, (2, steps)).astype(np.int32)
  target[:, 0] = tasks.BOS_ID
  return jnp.asarray(source), jnp.array([7, 5]), jnp.asarray(target)


@pytest.mark.parametrize('pos,kind,extra', CASES)
def test_cached_decoding_equals_the_full_forward(pos, kind, extra):
  """Rows prefill 1 and 3 target tokens, then step to 14 (past 2 × the 7-token source)."""
  extra = dict(extra)
  pointer = extra.pop('pointer', False)
  check_cached_decoding(*config(pos, kind, pointer, **extra))


def test_expected_monotonic_decoding_is_cached_like_the_full_forward():
  """seq2seq.monotonic_decode='expected' decodes with the training alignments, cached too."""
  cfg, tips = config('learned', 'monotonic')
  check_cached_decoding(cfg, dataclasses.replace(tips, monotonic_decode='expected'))


def check_cached_decoding(cfg, tips):
  params = random_params(cfg, tips)
  source, source_lengths, target = batch()
  _, full = full_forward(cfg, tips, tips.monotonic_decode)(params, source, source_lengths, target)
  lengths = jnp.array([1, 3])
  steps = target.shape[1] - 3
  arch = arch_lib.EncoderDecoderArch(types.SimpleNamespace(model=cfg, seq2seq=tips))
  stepper = arch.stepper(DecodeConfig(max_new_tokens=steps + 1), 3)    # decoding's mode
  assert stepper.model.mode == tips.monotonic_decode

  @jax.jit
  def cached(params, source, source_lengths, target):
    carry = (params, source, source_lengths)
    first, state = stepper.prefill(carry, target[:, :3], lengths)

    def body(state, j):
      pos = lengths + j
      token = jnp.take_along_axis(target, pos[:, None], 1)[:, 0]
      out, state = stepper.step(carry, state, token, pos)
      return state, out
    _, rest = jax.lax.scan(body, state, jnp.arange(steps))
    return jnp.concatenate([first[:, None], rest.swapaxes(0, 1)], axis=1)
  got = np.asarray(cached(params, source, source_lengths, target))
  full = np.asarray(full.log_probs)
  for b, n in enumerate([1, 3]):
    want = full[b, n - 1:n - 1 + steps + 1]
    np.testing.assert_allclose(got[b, :len(want)], want, rtol=1e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize('pos,kind,extra', CASES)
def test_encoder_sees_both_ways_decoder_only_the_past(pos, kind, extra):
  extra = dict(extra)
  pointer = extra.pop('pointer', False)
  cfg, tips = config(pos, kind, pointer, **extra)
  params = random_params(cfg, tips, seed=3)
  source, source_lengths, target = batch(seed=2)
  run = full_forward(cfg, tips)
  states, out = run(params, source, source_lengths, target)
  states2, out2 = run(params, source.at[0, 6].set(source[0, 6] % 30 + 5), source_lengths, target)
  assert np.abs(np.asarray(states2 - states)[0, 0]).max() > 1e-4     # a later token reaches position 0
  t = 6
  _, out3 = run(params, source, source_lengths, target.at[:, t].set(target[:, t] % 30 + 5))
  np.testing.assert_allclose(np.asarray(out3.log_probs[:, :t]), np.asarray(out.log_probs[:, :t]), atol=1e-6)
  assert np.abs(np.asarray(out3.log_probs - out.log_probs)[:, t:]).max() > 1e-4


def test_pointer_with_p_gen_zero_copies_the_last_layers_attention():
  cfg, tips = config('t5', 'softmax', True, num_layers=2)
  params = random_params(cfg, tips)
  params['decoder']['pointer']['b'] = jnp.asarray(-60.0)
  source, source_lengths, target = batch()
  _, out = full_forward(cfg, tips)(params, source, source_lengths, target)
  copy = np.einsum('bts,bsv->btv', np.asarray(out.attention[-1]).mean(1), np.eye(V)[np.asarray(source)])
  np.testing.assert_allclose(np.exp(np.asarray(out.log_probs)), copy, atol=1e-5)
  assert np.asarray(out.p_gen).max() < 1e-20


def test_hard_monotonic_attention_never_moves_backwards():
  cfg, tips = config('learned', 'monotonic', True)
  params = random_params(cfg, tips, seed=5, scale=0.5)
  source, source_lengths, target = batch()
  _, out = full_forward(cfg, tips)(params, source, source_lengths, target)
  for layer in out.attention:
    a = np.asarray(layer)                                   # [B, H, T, S], one-hot or zero rows
    assert set(np.unique(a)) <= {0.0, 1.0}
    assert np.all(a.sum(-1) <= 1)
    index = np.where(a.sum(-1) > 0, a.argmax(-1), 10 ** 6)   # attending nothing: past the end
    assert np.all(np.diff(index, axis=-1) >= 0)
    assert np.all(a[1, :, :, 5:] == 0)                     # never the padding of a 5-token source


def test_initial_monotonic_energies_can_reach_both_hard_decisions():
  """Hard decoding follows training only where p_ij is near 0 or 1: at initialisation every
  head's energy e = g vᵀ tanh(…)/‖v‖ + r must be able to reach σ(e) > 0.99 and < 0.01. Its range
  over tanh ∈ [−1, 1]^A is r ± g‖v/‖v‖‖₁ (the start g = 1/√A, r = −1 kept p below 0.5 everywhere)."""
  cfg, tips = config('learned', 'monotonic')
  cfg = dataclasses.replace(cfg, d_model=64, num_heads=4)            # A = 16, as the quick preset
  z = jnp.zeros((1, 4), jnp.int32)
  import flax.linen as nn
  params = nn.meta.unbox(
      EncoderDecoder(cfg, tips).init(jax.random.key(0), z, z, z + 1, z, z, z + 1)['params'])
  cross = params['decoder']['layer_0']['cross_attention']
  v, g, r = (np.asarray(cross[k], np.float64) for k in ('energy_v', 'energy_gain', 'energy_r'))
  reach = g * np.abs(v / np.linalg.norm(v, axis=-1, keepdims=True)).sum(-1)   # [H]
  sigmoid = lambda e: 1 / (1 + np.exp(-e))
  assert np.all(sigmoid(r + reach) > 0.99) and np.all(sigmoid(r - reach) < 0.01)


def test_embeddings_shared_or_separate():
  shapes = lambda share: jax.eval_shape(arch_lib.EncoderDecoderArch(from_config_dict({
      'model': dict(arch='encoder_decoder', vocab_size=V, d_model=16, num_heads=2, num_layers=1,
                    share_embeddings=share)})).init, jax.random.key(0))
  shared, separate = shapes(True), shapes(False)
  assert 'target_embedding' not in shared and 'target_embedding' in separate
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  assert count(separate) - count(shared) == V * 16


@pytest.mark.parametrize('arch,kind', [('encoder_decoder', 'location'), ('encoder_decoder', 'monotonic'),
                                       ('decoder', 'softmax')])
def test_packed_examples_do_not_see_each_other(arch, kind):
  """Row 0 is grain's packing of three examples; rows 1-3 hold each example alone: every output
  (and every cross-attention map) of an example is the same in both."""
  cfg = from_config_dict({'model': dict(arch=arch, vocab_size=V, num_layers=1, d_model=16, num_heads=2,
                                        pos='t5', attention_backend='xla'),
                          'seq2seq': dict(task=dict(name='rewrite', train_len=4, pack=3),
                                          cross_attention=kind, pointer=arch == 'encoder_decoder',
                                          location_width=3)})
  the_arch = arch_lib.make(cfg)
  packed = next(data.make_train_iterator(cfg, the_arch, 1))
  lengths = {k: 3 * v for k, v in the_arch.row_lengths().items()}
  main = 'source' if arch == 'encoder_decoder' else 'inputs'
  segments = packed[f'{main}_segment_ids'][0]
  count = int(segments.max())
  assert count >= 2
  examples = [data.TrainExamples(cfg, the_arch)[i] for i in range(count)]
  alone = [data.pad_example(e, lengths) for e in examples]
  rows = {k: np.concatenate([packed[k]] + [a[k][None] for a in alone]) for k in packed}
  params = jax.jit(the_arch.init)(jax.random.key(0))
  import flax.linen as nn
  params = jax.tree.map(lambda p: p * 2.0, nn.meta.unbox(params))
  out = jax.jit(lambda p, b: the_arch.forward(p, b))(params, rows)
  out_key = 'target_out' if arch == 'encoder_decoder' else 'targets'
  for k in range(count):
    where = np.flatnonzero(packed[f'{out_key}_segment_ids'][0] == k + 1)
    n = len(where)
    np.testing.assert_allclose(np.asarray(out.log_probs[0, where]), np.asarray(out.log_probs[k + 1, :n]),
                               rtol=1e-5, atol=1e-5)
    for layer in out.attention:
      src = np.flatnonzero(segments == k + 1)
      np.testing.assert_allclose(np.asarray(layer[0][:, where][:, :, src]),
                                 np.asarray(layer[k + 1][:, :n, :len(src)]), atol=2e-6)


def test_beam_search_scores_are_the_full_forwards_log_probabilities():
  """Beam search over the cached encoder-decoder (location-aware: its alignment state is
  reordered with the beams): each hypothesis' log-probability is what the full forward gives it."""
  from lcr.decode import beam
  cfg, tips = config('alibi', 'location')
  params = random_params(cfg, tips, seed=7, scale=0.6)
  source, source_lengths, target = batch()
  max_new = target.shape[1] - 1
  stepper = EncoderDecoderStepper(cfg, tips, DecodeConfig(max_new_tokens=max_new), 1)
  search = jax.jit(lambda p, s, n: beam.search_loop(
      stepper, (p, s, n), jnp.full((2, 1), tasks.BOS_ID, jnp.int32), jnp.ones((2,), jnp.int32),
      n=3, max_new=max_new, alpha=0.0, eos_id=tasks.EOS_ID))
  seqs, lens, _, raw = (np.asarray(x) for x in search(params, source, source_lengths))
  for k in range(3):
    hyps = np.full(target.shape, tasks.PAD_ID, np.int32)
    hyps[:, 0] = tasks.BOS_ID
    for b in range(2):
      hyps[b, 1:1 + lens[b, k]] = seqs[b, k, :lens[b, k]]
    _, out = full_forward(cfg, tips)(params, source, source_lengths, jnp.asarray(hyps))
    log_probs = np.asarray(out.log_probs)
    for b in range(2):
      want = sum(log_probs[b, t, hyps[b, t + 1]] for t in range(lens[b, k]))
      np.testing.assert_allclose(raw[b, k], want, rtol=1e-4, atol=1e-4)
  assert np.all(np.diff(raw, axis=1) <= 1e-6)             # best first
