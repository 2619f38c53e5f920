"""Attention with memory (lcr.mixers: Transformer-XL, Infini-attention) against NumPy and masks.

References:
  * Transformer-XL (Dai et al. 2019 §3.2): one layer in NumPy — softmax attention where query p
    sees keys (p // S)·S − M ≤ r ≤ p, RoPE from RoFormer's formula or ALiBi's bias; and a 2-layer
    model against lcr's independent ``blockwise`` pattern, which is the same mask when M = S, with
    the memory carried from one call to the next; no gradient reaches the memory.
  * Infini-attention (Munkhdalai et al. 2024 §2.1): one layer in NumPy over three segments —
    causal softmax within each segment, the memory read σ(Q)M/(σ(Q)z), the linear and delta
    updates and the per-head gate, σ = elu + 1.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr.config import ModelConfig
from lcr.decode.cache import CacheLayout
from lcr.mixers import infini, xl
from lcr.model import TransformerLM

from test_mixers import assert_close, elu1, heads, rope

RNG = np.random.default_rng(5)
BASE = ModelConfig(vocab_size=23, num_layers=1, d_model=16, num_heads=4, attention_backend='xla')
STATEFUL = CacheLayout('full', 1)   # recurrent layers ignore the layout's capacity


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def random_params(module, x, seed):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, *positions_and_docs(x)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: np.asarray(rng.normal(size=s.shape) * 0.5, np.float32),
                      nn.meta.unbox(shapes['params']))


def positions_and_docs(x):
  b, t = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)


def numpy_attention(q, k, v, visible, bias=None):
  """softmax(q·k/√d + bias) v over visible keys, per head: q [T,H,D], k/v [S,H,D], visible [T,S]."""
  logits = np.einsum('thd,shd->hts', q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  logits = np.where(visible[None], logits, -np.inf)
  return np.einsum('hts,shd->thd', softmax(logits), v)


def alibi_bias(t, slopes):
  i = np.arange(t)
  return -slopes[:, None, None] * (i[:, None] - i[None, :])


@pytest.mark.parametrize('pos,segment,memory,t', [('rope', 4, 2, 11), ('rope', 4, 9, 13),
                                                  ('alibi', 3, 5, 10), ('none', 5, 5, 12)])
def test_xl_layer_matches_numpy(pos, segment, memory, t):
  cfg = dataclasses.replace(BASE, pos=pos, memory='xl', segment_length=segment,
                            memory_length=memory)
  module = xl.XLAttention(cfg)
  x = RNG.normal(size=(1, t, cfg.d_model)).astype(np.float32)
  p = random_params(module, x, seed=1)
  q, k, v = (heads(x, p[n]['kernel'])[0] for n in ('query', 'key', 'value'))
  positions = np.arange(t)
  if pos == 'rope':
    q, k = rope(q[None], positions[None])[0], rope(k[None], positions[None])[0]
  i, j = positions[:, None], positions[None, :]
  visible = (j <= i) & (j >= (i // segment) * segment - memory)
  # ALiBi slopes for 4 heads: 2^(−8/4·h), h = 1 … 4 (Press et al. 2022 §3).
  bias = alibi_bias(t, 2.0 ** (-2.0 * np.arange(1, 5))) if pos == 'alibi' else None
  want = np.einsum('thk,hkd->td', numpy_attention(q, k, v, visible, bias), p['out']['kernel'])
  got = module.apply({'params': p}, x, *positions_and_docs(x))
  assert_close(np.asarray(got)[0], want)


def two_layer_xl(pos):
  """M = S = 4: the memory mask is lcr's blockwise pattern with block 4 (Sun et al. 2022 §3.3)."""
  cfg = dataclasses.replace(BASE, num_layers=2, pos=pos, memory='xl', segment_length=4,
                            memory_length=4)
  blockwise = dataclasses.replace(BASE, num_layers=2, pos=pos, attention='blockwise',
                                  attention_block=4)
  shapes = jax.eval_shape(lambda: TransformerLM(blockwise).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.4, jnp.float32),
                        nn.meta.unbox(shapes))
  return cfg, blockwise, params


@pytest.mark.parametrize('pos', ['rope', 'alibi', 't5'])
def test_xl_segments_with_memory_equal_one_forward_with_the_matching_mask(pos):
  """Segment 2 after segment 1 (memory carried in the cache) gives the logits a forward over both
  gives under the blockwise mask, in both of a 2-layer model's layers; one call over both too."""
  cfg, blockwise, params = two_layer_xl(pos)
  tokens = jnp.asarray(RNG.integers(0, 23, size=(2, 8)))
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  ones = jnp.ones((2, 4), jnp.int32)
  want = TransformerLM(blockwise).apply({'params': params}, tokens)
  model = TransformerLM(cfg, cache=STATEFUL)
  first, memory = model.apply({'params': params}, tokens[:, :4], positions[:, :4], ones,
                              fresh_cache=True, mutable=['cache'])
  second, _ = model.apply({'params': params, **memory}, tokens[:, 4:], positions[:, 4:], ones,
                          mutable=['cache'])
  assert_close(np.asarray(second), np.asarray(want)[:, 4:])
  assert_close(np.asarray(first), np.asarray(want)[:, :4])
  assert_close(np.asarray(TransformerLM(cfg).apply({'params': params}, tokens)), np.asarray(want))


def test_xl_memory_gets_no_gradient():
  """∂(segment 2's output)/∂(segment 1's input) is zero with the memory's stop-gradient, though
  segment 2 reads segment 1 (the blockwise model without it has a non-zero one), and
  changing segment 1 still changes segment 2 (it is read, as memory)."""
  cfg = dataclasses.replace(two_layer_xl('rope')[0], num_layers=1)
  module = xl.XLAttention(cfg)
  x = RNG.normal(size=(1, 8, cfg.d_model)).astype(np.float32)
  p = random_params(module, x, seed=3)
  pos, docs = positions_and_docs(x)
  second = lambda p, x: jnp.sum(module.apply({'params': p}, x, pos, docs)[:, 4:] ** 2)
  grad_x = np.asarray(jax.grad(second, argnums=1)(p, x))
  np.testing.assert_array_equal(grad_x[:, :4], 0.0)
  assert np.abs(grad_x[:, 4:]).max() > 1e-3
  x_changed = x.copy()
  x_changed[:, :4] += 1.0
  assert not np.allclose(second(p, x), second(p, x_changed))


def numpy_infini(x, p, cfg, update):
  """Munkhdalai et al. 2024 §2.1 for one row, segment by segment (σ = elu + 1, RoPE on positions)."""
  s = cfg.segment_length
  q, k, v = (heads(x[None], p[n]['kernel'])[0] for n in ('query', 'key', 'value'))
  t, h, d = q.shape
  positions = np.arange(t)
  q_rot, k_rot = rope(q[None], positions[None])[0], rope(k[None], positions[None])[0]
  memory, z = np.zeros((h, d, d)), np.zeros((h, d))
  gate = 1.0 / (1.0 + np.exp(-p['gate']))
  out = np.zeros((t, h, d))
  for start in range(0, t, s):
    seg = slice(start, min(start + s, t))
    n = seg.stop - seg.start
    local = numpy_attention(q_rot[seg], k_rot[seg], v[seg], np.tril(np.ones((n, n), bool)))
    sq, sk = elu1(q[seg]), elu1(k[seg])
    den = np.einsum('thd,hd->th', sq, z)
    num = np.einsum('thd,hde->the', sq, memory)
    read = np.where(den[..., None] > 0, num / np.where(den > 0, den, 1)[..., None], 0.0)
    out[seg] = gate[None, :, None] * read + (1 - gate[None, :, None]) * local
    written = v[seg]
    if update == 'delta':
      k_den = np.einsum('thd,hd->th', sk, z)
      k_num = np.einsum('thd,hde->the', sk, memory)
      written = v[seg] - np.where(k_den[..., None] > 0, k_num / np.where(k_den > 0, k_den, 1)[..., None], 0)
    if seg.stop < t:   # lcr folds a segment into M when the next one starts
      memory = memory + np.einsum('thd,the->hde', sk, written)
      z = z + sk.sum(0)
  return np.einsum('thk,hkd->td', out, p['out']['kernel']), memory, z


@pytest.mark.parametrize('update', ['linear', 'delta'])
@pytest.mark.parametrize('t', [15, 13])
def test_infini_layer_over_three_segments_matches_numpy(update, t):
  """Segments of 5: three full ones (15 tokens) or a short third (13); the gate differs per head
  (β from −2 to 1.5), so a gate applied to the wrong head or side fails."""
  cfg = dataclasses.replace(BASE, pos='rope', memory='infini', segment_length=5,
                            memory_update=update)
  module = infini.InfiniAttention(cfg, cache=STATEFUL)
  x = RNG.normal(size=(1, t, cfg.d_model)).astype(np.float32)
  p = random_params(infini.InfiniAttention(cfg), x, seed=4)
  p['gate'] = np.asarray([-2.0, -0.5, 0.5, 1.5], np.float32)
  got, cache = module.apply({'params': p}, x, *positions_and_docs(x), fresh_cache=True,
                            mutable=['cache'])
  want, memory, z = numpy_infini(x[0], p, cfg, update)
  assert_close(np.asarray(got)[0], want)
  assert_close(np.asarray(cache['cache']['memory'].value)[0], memory)
  assert_close(np.asarray(cache['cache']['normaliser'].value)[0], z)


def test_infini_gate_mixes_memory_and_local_attention_as_specified():
  """β → +∞ reads only the memory (0 in the first segment, whose memory is empty); β → −∞ is
  attention within the segment; β = 0 is their mean."""
  cfg = dataclasses.replace(BASE, pos='none', memory='infini', segment_length=4)
  module = infini.InfiniAttention(cfg)
  x = RNG.normal(size=(1, 8, cfg.d_model)).astype(np.float32)
  p = random_params(module, x, seed=6)
  run = lambda beta: np.asarray(module.apply({'params': {**p, 'gate': np.full(4, beta, np.float32)}},
                                             x, *positions_and_docs(x)))
  memory_only, local_only, half = run(60.0), run(-60.0), run(0.0)
  np.testing.assert_allclose(memory_only[:, :4], 0.0, atol=1e-6)
  assert np.abs(memory_only[:, 4:]).max() > 1e-2
  assert_close(half, 0.5 * (memory_only + local_only))
  q, k, v = (heads(x, p[n]['kernel'])[0] for n in ('query', 'key', 'value'))
  within = np.kron(np.eye(2, dtype=bool), np.tril(np.ones((4, 4), bool)))
  want = np.einsum('thk,hkd->td', numpy_attention(q, k, v, within), p['out']['kernel'])
  assert_close(local_only[0], want)
