"""KV-cache decoding against the full forward pass, the cache layouts against NumPy restatements.

The reference for cached decoding is the model's own full forward over the whole sequence: the
invariant "prefill + one token per step gives the logits of the full forward" (float32, 1e-5),
for every positional encoding, RoPE scaling, attention pattern and MHA/GQA/MQA, with prompts of
different lengths in one batch and positions past the training length. StreamingLLM's sinks are
checked against a full forward over [sinks ++ last window] at the positions within the cache.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import config as config_lib
from lcr.config import DecodeConfig, ModelConfig
from lcr.decode import cache as cache_lib
from lcr.decode import engine
from lcr.model import TransformerLM

from conftest import random_params as init

VOCAB = 29
BASE = dict(vocab_size=VOCAB, num_layers=2, d_model=24, num_heads=6, max_len=64,
            rope_original_length=0, attention_backend='xla')
HEADS = {'mha': 6, 'gqa': 2, 'mqa': 1}
VARIANTS = {'causal': {}, 'sliding': dict(attention='sliding', window=6),
            'sinks': dict(attention='sinks', window=5, sink_tokens=2),
            'blockwise': dict(attention='blockwise', attention_block=4)}
SCALED = dict(rope_original_length=8, rope_factor=2.5, yarn_beta_fast=4.0, yarn_beta_slow=1.0)
DECODE = DecodeConfig()


def assert_close(got, want, **kw):
  """Equal to float32 precision: |got − want| ≤ 1e-5 · (|want| + max |want|)."""
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), **kw)


def full_logits(cfg, params, tokens):
  return np.asarray(jax.jit(TransformerLM(cfg).apply)({'params': params}, jnp.asarray(tokens)))


def reference_rows(full, lengths, steps):
  """[B, steps + 1, V]: the full forward's logits at positions n_b − 1 … n_b − 1 + steps."""
  return np.stack([full[b, n - 1:n + steps] for b, n in enumerate(lengths)])


def cases():
  """A covering set: every encoding with the full cache and with StreamingLLM's renumbering cache,
  the ring caches with encodings of each kind (rotated keys, unrotated keys, biases, absolute),
  every RoPE scaling with the full cache and dynamic NTK / YaRN with the rings; MHA, GQA and MQA
  rotate through them."""
  names = list(HEADS)
  out = [(pos, 'none', variant) for variant in ('causal', 'sinks')
         for pos in config_lib.POSITIONAL_ENCODINGS]
  out += [(pos, 'none', 'sliding') for pos in ('rope', 'xpos', 'alibi', 'learned')]
  out += [(pos, 'none', 'blockwise') for pos in ('t5', 'sinusoidal', 'none')]
  out += [('rope', scaling, 'causal') for scaling in ('linear', 'ntk', 'dynamic_ntk', 'yarn')]
  out += [('rope', 'dynamic_ntk', 'sliding'), ('rope', 'dynamic_ntk', 'sinks'),
          ('rope', 'yarn', 'sinks'), ('rope', 'yarn', 'blockwise')]
  return [(*case, names[i % 3]) for i, case in enumerate(out)]


def model_config(pos, scaling, variant, heads, **more):
  extra = dict(SCALED, rope_scaling=scaling) if scaling != 'none' else {}
  return ModelConfig(**{**BASE, 'pos': pos, 'num_kv_heads': HEADS[heads], **VARIANTS[variant],
                        **extra, **more})


@pytest.mark.parametrize('pos,scaling,variant,heads', cases())
def test_prefill_and_steps_equal_the_full_forward(pos, scaling, variant, heads):
  """Rows of prompt lengths 3 and 6 continue to 20 tokens (past the training length 8)."""
  cfg = model_config(pos, scaling, variant, heads)
  params = init(cfg)
  tokens = np.random.default_rng(1).integers(3, VOCAB, size=(2, 20))
  lengths = np.array([3, 6])
  steps = 20 - 6
  cached = engine.cached_logits(params, cfg, DECODE, tokens, lengths)
  want = reference_rows(full_logits(cfg, params, tokens), lengths, steps)
  if variant == 'sinks':   # the cache renumbers once the window is full: compare until then
    capacity = cfg.sink_tokens + cfg.window
    for b, n in enumerate(lengths):
      upto = capacity - n + 1
      assert_close(cached[b, :upto], want[b, :upto])
  else:
    assert_close(cached[:, :steps], want[:, :steps])


@pytest.mark.parametrize('pos', ['rope', 'xpos', 'alibi', 't5', 'none'])
def test_sinks_steps_equal_a_forward_over_sinks_and_window_at_cache_positions(pos):
  """StreamingLLM past the window: one layer, so cached keys/values depend on their token alone
  (with more layers they also carry the context each token had when it entered the cache)."""
  cfg = model_config(pos, 'none', 'sinks', 'gqa', num_layers=1)
  params = init(cfg, seed=2)
  n, w = cfg.sink_tokens, cfg.window
  tokens = np.random.default_rng(3).integers(3, VOCAB, size=(1, 24))
  cached = engine.cached_logits(params, cfg, DECODE, tokens, np.array([4]))
  queries = np.arange(n + w - 1, 23)                      # from the first full window on
  kept = np.stack([np.r_[0:n, p - w + 1:p + 1] for p in queries])   # sinks ++ last window
  want = full_logits(dataclasses.replace(cfg, attention='causal'), params, tokens[0, kept])[:, -1]
  assert_close(cached[0, queries - 3], want)


def numpy_dynamic_ntk_attention(q, k, v, factor, original, base=10000.0):
  """Each query p rotates itself and every key r ≤ p with Hugging Face's dynamic base at p + 1."""
  t, h, d = q.shape
  out = np.zeros_like(q)
  for p in range(t):
    length = max(p + 1, original)
    b = base * (factor * length / original - (factor - 1)) ** (d / (d - 2))
    inv = 1.0 / b ** (np.arange(0, d, 2) / d)
    def rot(x, pos):
      a = pos[:, None] * inv[None]
      c, s = np.cos(a)[:, None], np.sin(a)[:, None]
      x1, x2 = x[..., :d // 2], x[..., d // 2:]
      return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    qp = rot(q[p:p + 1], np.array([p], float))[0]           # [H, D]
    kr = rot(k[:p + 1], np.arange(p + 1, dtype=float))      # [p + 1, K, D]
    kr = np.repeat(kr, h // k.shape[1], axis=1)
    s = np.einsum('hd,rhd->hr', qp, kr) / np.sqrt(d)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[p] = np.einsum('hr,rhd->hd', w, np.repeat(v[:p + 1], h // k.shape[1], axis=1))
  return out


def test_per_query_dynamic_ntk_attention_matches_numpy():
  from lcr.attention import masks, per_query_rope
  from lcr import positional
  rng = np.random.default_rng(8)
  t, h, kv, d = 19, 6, 2, 8
  q, k, v = rng.normal(size=(t, h, d)), rng.normal(size=(t, kv, d)), rng.normal(size=(t, kv, d))
  cfg = ModelConfig(**{**BASE, 'd_model': 48, 'pos': 'rope', **SCALED, 'rope_scaling': 'dynamic_ntk'})
  positions = jnp.arange(t)[None]
  got = per_query_rope.attention(
      jnp.asarray(q[None], jnp.float32), jnp.asarray(k[None], jnp.float32),
      jnp.asarray(v[None], jnp.float32),
      inv_freq_BxTxR=positional.dynamic_inv_freq(cfg, positions + 1), q_pos=positions,
      k_pos=positions, q_segments=None, k_segments=None, mask=masks.MaskSpec('dense'))
  want = numpy_dynamic_ntk_attention(q, k, v, cfg.rope_factor, cfg.rope_original_length)
  assert_close(np.asarray(got[0]), want)


def test_rotated_key_cache_for_dynamic_ntk_drifts_from_the_exact_cache():
  """Hugging Face's cache of rotated keys is a different computation past the original length."""
  cfg = model_config('rope', 'dynamic_ntk', 'causal', 'mha')
  params = init(cfg, seed=6)
  tokens = np.random.default_rng(7).integers(3, VOCAB, size=(1, 20))
  lengths = np.array([4])
  exact = engine.cached_logits(params, cfg, DECODE, tokens, lengths)
  rotated = engine.cached_logits(params, cfg, dataclasses.replace(DECODE, rotated_key_cache=True),
                                 tokens, lengths)
  assert_close(rotated[:, :4], exact[:, :4])  # within L
  assert np.max(np.abs(rotated[:, 8:] - exact[:, 8:])) > 1e-3


# ----------------------------------------------------------------------------------------------
# Layouts and slot arithmetic.


def numpy_slot_targets(kind, capacity, sinks, last):
  """Restatement: the latest position ≤ last each slot holds, by walking positions in order."""
  held = np.full(capacity, -1)
  for p in range(last + 1):
    if kind == 'full':
      held[p] = p
    elif p < sinks:
      held[p] = p
    else:
      held[sinks + (p - sinks) % (capacity - sinks)] = p
  return held


@pytest.mark.parametrize('kind,capacity,sinks', [('full', 12, 0), ('ring', 5, 0), ('sinks', 7, 3)])
def test_slot_targets_match_writing_positions_one_by_one(kind, capacity, sinks):
  layout = cache_lib.CacheLayout(kind, capacity, sinks)
  lasts = np.arange(-1, 11)
  got = np.asarray(cache_lib.slot_targets(layout, jnp.asarray(lasts)))
  for last, row in zip(lasts, got):
    np.testing.assert_array_equal(row, numpy_slot_targets(kind, capacity, sinks, last))


def test_write_keeps_the_latest_positions_of_a_prompt_longer_than_the_ring():
  layout = cache_lib.CacheLayout('ring', 4)
  cached = jnp.full((2, 4), -7)
  new = jnp.asarray([[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 0, 0, 0, 0]])   # positions 0..
  out = np.asarray(cache_lib.write(layout, cached, new, jnp.asarray([0, 0]), jnp.asarray([6, 2])))
  np.testing.assert_array_equal(out, [[14, 15, 16, 13], [20, 21, 22, -7]])


def test_layouts_follow_the_attention_pattern():
  base = ModelConfig(**{**BASE, 'pos': 'rope'})
  layout = lambda **kw: cache_lib.layout_for(dataclasses.replace(base, **kw), 1000)
  assert layout() == cache_lib.CacheLayout('full', 1000, rotated=True)
  assert layout(attention='sliding', window=6) == cache_lib.CacheLayout('ring', 6, rotated=True)
  assert layout(attention='blockwise', attention_block=4).capacity == 8
  sinks = layout(attention='sinks', window=5, sink_tokens=2)
  assert (sinks.kind, sinks.capacity, sinks.sinks, sinks.renumber, sinks.rotated) == (
      'sinks', 7, 2, True, False)
  assert layout(attention='longformer', window=5, global_tokens=3).sinks == 3
  assert not layout(rope_scaling='dynamic_ntk', rope_original_length=8).rotated
  assert not cache_lib.layout_for(dataclasses.replace(base, pos='xpos'), 100).rotated
  assert layout(attention='sliding', window=2000).kind == 'full'   # never evicts


def test_renumbering_moves_the_window_and_keeps_the_sinks():
  layout = cache_lib.CacheLayout('sinks', 6, 2, renumber=True)
  positions = jnp.asarray([[0, 1, 9, 10, 11, 12]])
  got = np.asarray(cache_lib.renumber(layout, positions, jnp.asarray([12])))
  np.testing.assert_array_equal(got, [[0, 1, 2, 3, 4, 5]])   # query 12 → 5 = capacity − 1
