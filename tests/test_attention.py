"""Attention backends and patterns against a float64 NumPy reference, forward and gradients.

The references here are written from the definitions (the papers' masks, softmax attention) and
share no code with lcr.attention: masks in NumPy, the forward pass in NumPy float64, gradients by
``jax.grad`` of a dense float64 implementation in this file.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcr import attention, config, positional
from lcr.attention import MaskSpec, cpu_flash, dense, kernels
from lcr.config import ConfigError, ModelConfig

B, T, H, KV, D = 2, 37, 6, 2, 8           # GQA, 6 heads (ALiBi's non-power-of-two slopes)
CHUNK = 8                                 # 37 is not a multiple of 8
T5 = ModelConfig(d_model=H * D, num_heads=H, pos='t5', t5_num_buckets=8, t5_max_distance=20)

# ----------------------------------------------------------------------------------------------
# Reference masks, written from each paper's definition on positions p (query) and r (key).


def _fmix32(x: int) -> int:
  x &= 0xFFFFFFFF
  x ^= x >> 16
  x = (x * 0x85EBCA6B) & 0xFFFFFFFF
  x ^= x >> 13
  x = (x * 0xC2B2AE35) & 0xFFFFFFFF
  return x ^ (x >> 16)


def reference_random_blocks(seed, q_block, draws, choices):
  """The documented BigBird draw: fmix(fmix(q·2654435761 + m mod 2³²) ⊕ fmix(seed)) mod choices."""
  return {_fmix32(_fmix32((q_block * 2654435761 + m) & 0xFFFFFFFF) ^ _fmix32(seed)) % choices
          for m in range(draws)}


def reference_mask(spec, qp, kp, qs=None, ks=None, kv_len=None):
  """[B, T, S] bool from the definitions in MaskSpec's docstring, pair by pair."""
  b, t = qp.shape
  s = kp.shape[1]
  out = np.zeros((b, t, s), bool)
  for bi in range(b):
    for i in range(t):
      for j in range(s):
        p, r = int(qp[bi, i]), int(kp[bi, j])
        if spec.causal and r > p:
          continue
        if qs is not None and qs[bi, i] != ks[bi, j]:
          continue
        out[bi, i, j] = _pattern(spec, p, r, kv_len)
  return out


def _pattern(spec, p, r, kv_len):
  local = (p - r < spec.window) if spec.causal else abs(p - r) < spec.window
  is_global = r < spec.global_tokens or p < spec.global_tokens
  if spec.kind == 'dense':
    return True
  if spec.kind == 'sliding':
    return local
  if spec.kind == 'longformer':
    return local or is_global
  if spec.kind == 'sinks':
    return local or r < spec.sink_tokens
  if spec.kind == 'grouped':   # LongLoRA §3.2: attention within groups of block, offset by shift
    shift = getattr(spec, 'shift', 0)
    return (p - shift) // spec.block == (r - shift) // spec.block
  pb, rb = p // spec.block, r // spec.block
  near = (0 if spec.causal else -1) <= pb - rb <= 1
  if spec.kind == 'blockwise':
    return near
  choices = pb + 1 if spec.causal else -(-kv_len // spec.block)
  return near or is_global or rb in reference_random_blocks(spec.seed, pb, spec.random_blocks,
                                                             choices)


# ----------------------------------------------------------------------------------------------
# Reference attention: NumPy float64 forward, dense float64 JAX for gradients.


def reference_attention(q, k, v, mask, bias=None, scale=None, factor=None):
  """softmax(q·kᵀ·scale·factor + bias) v over the visible keys, K/V repeated per query group."""
  h, kv = q.shape[2], k.shape[2]
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = np.einsum('bthd,bshd->bhts', q, k) * scale
  if factor is not None:
    s = s * factor[:, None, :, None]
  if bias is not None:
    s = s + bias
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum('bhts,bshd->bthd', p / p.sum(-1, keepdims=True), v)


ENCODINGS = ('none', 'rope', 'xpos', 'alibi', 't5')


def bias_weights(rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Per batch row, whether ALiBi / the T5 bias applies: rows are grouped by encoding."""
  per = rows // len(ENCODINGS)
  enc = np.repeat(np.asarray(ENCODINGS), per)
  return (enc == 'alibi').astype(np.float32), (enc == 't5').astype(np.float32)


def reference_bias(table, qp, kp, h):
  """Per row, ALiBi (Press et al. 2022 §3), the T5 table lookup or nothing, by encoding group.

  Returns (alibi [B,H,T,S] float64, t5 weight [B], T5 bucket of each pair [B,T,S]).
  """
  alibi_w, t5_w = bias_weights(qp.shape[0])
  dist = (qp[:, :, None] - kp[:, None, :]).astype(np.float64)
  alibi = alibi_w[:, None, None, None] * (
      -positional.alibi_slopes(h)[None, :, None, None] * dist[:, None])
  buckets = np.asarray(positional.t5_bucket(jnp.asarray(qp), jnp.asarray(kp), 8, 20))
  return alibi, t5_w.astype(np.float64), buckets


def dense_bias(table, alibi, t5_w, buckets, xp=np):
  return alibi + t5_w[:, None, None, None] * xp.moveaxis(table[buckets], -1, 1)


@functools.partial(jax.jit, static_argnames='groups')
def _reference_grads(q, k, v, table, ct, mask, alibi, t5_w, buckets, factor, groups):
  def loss(q, k, v, table):
    kr, vr = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = jnp.einsum('bthd,bshd->bhts', q, kr) * q.shape[-1] ** -0.5 * factor[:, None, :, None]
    s = s + dense_bias(table, alibi, t5_w, buckets, jnp)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    out = jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(s, axis=-1), vr)
    return jnp.sum(out * ct)
  return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, table)


def reference_grads(q, k, v, table, ct, mask, bias_parts, factor=None):
  """Gradients of sum(out · ct) w.r.t. q, k, v and the T5 table, dense float64 in JAX."""
  alibi, t5_w, buckets = bias_parts
  factor = np.ones(mask.shape[:2]) if factor is None else factor
  with jax.enable_x64(True):
    args = [jnp.asarray(x, jnp.float64) for x in (q, k, v, table, ct)]
    grads = _reference_grads(*args, mask, jnp.asarray(alibi, jnp.float64),
                             jnp.asarray(t5_w, jnp.float64), buckets,
                             jnp.asarray(factor, jnp.float64), groups=q.shape[2] // k.shape[2])
    return [np.asarray(g) for g in grads]


def no_bias(mask):
  b, t, s = mask.shape
  return np.zeros((b, 1, t, s)), np.zeros(b), np.zeros((b, t, s), int)


FAST_COMPILE = {'xla_backend_optimization_level': 0}   # these tests compile far more than they run


@functools.partial(jax.jit, static_argnames=('backend', 'spec', 'chunk', 'base', 'use_bias'),
                   compiler_options=FAST_COMPILE)
def lcr_forward_and_grads(q, k, v, table, ct, qp, kp, qs, ks, *, backend, spec, chunk, base=0,
                          use_bias=True):
  alibi_w, t5_w = (jnp.asarray(w)[:, None, None, None] for w in bias_weights(q.shape[0]))
  alibi = positional.alibi_bias(q.shape[2])

  def loss(q, k, v, table):
    t5 = positional.t5_bias(T5, table)
    bias_fn = lambda qp, kp: alibi_w * alibi(qp, kp) + t5_w * t5(qp, kp)
    bias_fn = bias_fn if use_bias else None
    out = attention.attend(q, k, v, q_pos=qp, k_pos=kp, q_segments=qs, k_segments=ks,
                           bias_fn=bias_fn, mask=spec, chunk=chunk, length_scale_base=base,
                           backend=backend)
    return jnp.sum(out * ct), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, table)
  return out, grads


def inputs(seed, t=T, s=T, rows=B):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(rows, t, H, D)).astype(np.float32)
  k, v = rng.normal(size=(2, rows, s, KV, D)).astype(np.float32)
  table = rng.normal(size=(8, H)).astype(np.float32)
  ct = rng.normal(size=(rows, t, H, D)).astype(np.float32)
  return q, k, v, table, ct


def rotated(q, k, qp, kp):
  """Rows of the rope and xpos groups with q, k rotated by lcr.positional (the others as given)."""
  q, k = q.copy(), k.copy()
  per = q.shape[0] // len(ENCODINGS)
  for i, pos in enumerate(ENCODINGS):
    if positional.REGISTRY[pos].kind == 'rotary':
      rows = slice(i * per, (i + 1) * per)
      cfg = ModelConfig(d_model=H * D, num_heads=H, num_kv_heads=KV, pos=pos)
      q[rows], k[rows] = (np.asarray(x) for x in positional.rotate(
          cfg, jnp.asarray(q[rows]), jnp.asarray(k[rows]), jnp.asarray(qp[rows]),
          jnp.asarray(kp[rows])))
  return q, k


# Row 0 packs two documents (positions restart, segment ids change); row 1 is one document.
POSITIONS = np.stack([np.r_[np.arange(20), np.arange(T - 20)], np.arange(T)])
SEGMENTS = np.stack([np.r_[[1] * 20, [2] * (T - 20)], np.ones(T, int)])

MASKS = {
    'causal': MaskSpec(),
    'sliding': MaskSpec('sliding', window=6),
    'longformer': MaskSpec('longformer', window=5, global_tokens=3),
    'bigbird': MaskSpec('bigbird', block=4, global_tokens=2, random_blocks=2, seed=3),
    'sinks': MaskSpec('sinks', window=6, sink_tokens=3),
    'blockwise': MaskSpec('blockwise', block=8),
    'length_scaled': MaskSpec(),
}


def check_against_reference(backend, spec, qp, kp, qs, ks, *, chunk=CHUNK, base=0, seed=0,
                            use_bias=True):
  """Every positional encoding (one group of batch rows each) against the float64 reference.

  use_bias=False leaves out the ALiBi and T5 logit biases (their rows then have no encoding)."""
  tile = lambda x: None if x is None else np.tile(x, (len(ENCODINGS), 1))
  qp, kp, qs, ks = tile(qp), tile(kp), tile(qs), tile(ks)
  rows, t, s = qp.shape[0], qp.shape[1], kp.shape[1]
  q, k, v, table, ct = inputs(seed, t, s, rows)
  q, k = rotated(q, k, qp, kp)
  out, grads = lcr_forward_and_grads(q, k, v, table, ct, qp, kp, qs, ks, backend=backend,
                                     spec=spec, chunk=chunk, base=base, use_bias=use_bias)
  mask = reference_mask(spec, qp, kp, qs, ks, kv_len=s)
  assert mask.any(-1).all(), 'every query must see a key for the reference softmax'
  factor = np.maximum(1.0, np.log(qp + 1.0) / np.log(base)) if base else None
  f64 = [x.astype(np.float64) for x in (q, k, v)]
  parts = reference_bias(table, qp, kp, H) if use_bias else no_bias(mask)
  want = reference_attention(*f64, mask, dense_bias(table.astype(np.float64), *parts),
                             factor=factor)
  want_grads = reference_grads(*f64, table, ct, mask, parts, factor)
  per = rows // len(ENCODINGS)
  for i, pos in enumerate(ENCODINGS):
    r = slice(i * per, (i + 1) * per)
    np.testing.assert_allclose(np.asarray(out)[r], want[r], rtol=1e-5, atol=1e-5, err_msg=pos)
    for name, got, wanted in zip('qkv', grads, want_grads):
      np.testing.assert_allclose(np.asarray(got)[r], wanted[r], rtol=1e-5, atol=1e-5,
                                 err_msg=f'{pos}: d/d{name}')
  np.testing.assert_allclose(np.asarray(grads[3]), want_grads[3], rtol=1e-5, atol=1e-5,
                             err_msg='d/d(T5 table)')   # only the T5 rows contribute


@pytest.mark.parametrize('mask', list(MASKS))
@pytest.mark.parametrize('backend', ['xla', 'chunked'])
def test_backend_matches_float64_reference_for_every_encoding(backend, mask):
  base = 16 if mask == 'length_scaled' else 0
  check_against_reference(backend, MASKS[mask], POSITIONS, POSITIONS, SEGMENTS, SEGMENTS,
                          base=base)


def test_chunked_is_exact_when_positions_do_not_follow_the_index():
  """Tile skipping uses position ranges, so shuffled positions must still give exact results."""
  rng = np.random.default_rng(5)
  qp = np.stack([rng.permutation(T), rng.permutation(T) + 3])
  check_against_reference('chunked', MASKS['sliding'], qp, qp, None, None, chunk=16)


@pytest.mark.parametrize('backend,spec', [
    ('xla', MaskSpec(causal=False)), ('chunked', MaskSpec(causal=False)),
    ('chunked', MaskSpec('bigbird', False, block=4, random_blocks=2, seed=1))])
def test_cross_attention_matches_reference(backend, spec):
  """Queries from one sequence (23 tokens), keys/values from another (37), bidirectional."""
  t, s = 23, T
  qp = np.broadcast_to(np.arange(t), (B, t))
  kp = np.broadcast_to(np.arange(s), (B, s))
  qs = np.stack([np.r_[[1] * 10, [2] * 13], np.ones(t, int)])
  ks = np.stack([np.r_[[1] * 20, [2] * 17], np.ones(s, int)])
  check_against_reference(backend, spec, qp, kp, qs, ks)


LONG = 150                                # two query blocks of 75 in the xla backend
LONG_POSITIONS = np.stack([np.r_[np.arange(70), np.arange(LONG - 70)], np.arange(LONG)])
LONG_SEGMENTS = np.stack([np.r_[[1] * 70, [2] * (LONG - 70)], np.ones(LONG, int)])


def test_query_block_counts():
  causal = MaskSpec()
  assert [dense.query_blocks(causal, t, t) for t in (64, 127, 128, 150, 256, 4096)] == [1, 1, 2, 2, 4, 8]
  assert dense.query_blocks(MaskSpec(causal=False), 256, 256) == 1
  assert dense.query_blocks(causal, 256, 300) == 1                     # not self-attention
  assert dense.query_blocks(causal, 256, 256, has_bias=True) == 1      # ALiBi, T5: dense
  assert dense.block_bounds(150, 2) == [(0, 75), (75, 150)]


@pytest.mark.parametrize('mask', ['causal', 'sliding', 'longformer'])
def test_xla_query_blocks_match_reference_on_packed_rows(mask):
  visible = MASKS[mask].visible(LONG_POSITIONS, LONG_POSITIONS, LONG_SEGMENTS, LONG_SEGMENTS)
  assert bool(dense.blocks_are_exact(visible, 2))           # the blocked path is the one tested
  check_against_reference('xla', MASKS[mask], LONG_POSITIONS, LONG_POSITIONS, LONG_SEGMENTS,
                          LONG_SEGMENTS, use_bias=False)
  check_against_reference('xla', MASKS[mask], LONG_POSITIONS, LONG_POSITIONS, LONG_SEGMENTS,
                          LONG_SEGMENTS)                   # with ALiBi and T5 rows: dense


def test_xla_falls_back_to_dense_when_a_skipped_key_is_visible():
  rng = np.random.default_rng(3)
  qp = np.stack([rng.permutation(LONG), np.arange(LONG)])      # row 0: positions out of order
  assert not bool(dense.blocks_are_exact(MaskSpec().visible(qp, qp), 2))
  check_against_reference('xla', MaskSpec(), qp, qp, None, None, use_bias=False)


def check_query_with_no_visible_key(backend, grad_atol=1e-6):
  """Queries 2-3 belong to a document with no keys: uniform weights over all keys, never NaN, and
  the gradients of differentiating a dense forward pass in which every masked logit is
  MASK_VALUE (written here; a row with every logit masked is then uniform), so none reach q."""
  t, s = 5, 7
  q, k, v, _, _ = inputs(4, t, s, rows=1)
  ct = np.random.default_rng(5).normal(size=q.shape).astype(np.float32)
  qp, kp = np.arange(t)[None], np.arange(s)[None]
  qs, ks = np.asarray([[1, 1, 3, 3, 1]]), np.ones((1, s), int)

  def lcr(q, k, v):
    out = attention.attend(q, k, v, q_pos=qp, k_pos=kp, q_segments=qs, k_segments=ks,
                           causal=False, backend=backend)
    return jnp.sum(out * ct), out

  def differentiated(q, k, v):   # the reference forward pass, differentiated by JAX
    kr, vr = (jnp.repeat(x, H // KV, axis=2) for x in (k, v))
    logits = jnp.einsum('bthd,bshd->bhts', q, kr) * D ** -0.5
    logits = jnp.where(jnp.asarray(qs[:, None, :, None] == ks[:, None, None, :]), logits,
                       attention.MASK_VALUE)
    out = jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, axis=-1), vr)
    return jnp.sum(out * ct), out

  (_, out), grads = jax.value_and_grad(lcr, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, want), want_grads = jax.value_and_grad(differentiated, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out)[0, 2:4],
                             np.broadcast_to(np.repeat(v.mean(1), H // KV, axis=1), (2, H, D)),
                             rtol=1e-5, atol=1e-6)
  for got, wanted in zip(grads, want_grads):
    np.testing.assert_allclose(got, wanted, rtol=1e-5, atol=grad_atol)
  assert not np.asarray(grads[0])[0, 2:4].any()


def test_xla_query_with_no_visible_key_averages_values_and_passes_no_gradient_to_q():
  check_query_with_no_visible_key('xla')


# ----------------------------------------------------------------------------------------------
# The patterns against hand-written pairs.


def pairs(spec, positions, kv_len=None):
  p = np.asarray(positions)[None]
  m = np.asarray(attention.visible(p, p, None, None, mask=spec, kv_len=kv_len))[0]
  return {(int(i), int(j)) for i, j in zip(*np.nonzero(m))}


def test_sparse_patterns_match_their_definitions():
  pos = np.arange(10)
  lower = {(i, j) for i in range(10) for j in range(i + 1)}
  assert pairs(MaskSpec(), pos) == lower
  assert pairs(MaskSpec('sliding', window=3), pos) == {(i, j) for i, j in lower if i - j < 3}
  assert pairs(MaskSpec('sliding', False, window=2), pos) == {
      (i, j) for i in range(10) for j in range(10) if abs(i - j) < 2}
  # Longformer: window 2, token 0 global: everyone sees 0; 0 sees only itself (causal).
  assert pairs(MaskSpec('longformer', window=2, global_tokens=1), pos) == {
      (i, j) for i, j in lower if i - j < 2 or j == 0}
  assert pairs(MaskSpec('longformer', False, window=2, global_tokens=1), pos) == {
      (i, j) for i in range(10) for j in range(10) if abs(i - j) < 2 or 0 in (i, j)}
  assert pairs(MaskSpec('sinks', window=2, sink_tokens=2), pos) == {
      (i, j) for i, j in lower if i - j < 2 or j < 2}
  # Blockwise causal with block 4: blocks {0-3}, {4-7}, {8, 9}; query 9 sees keys 4..9.
  assert pairs(MaskSpec('blockwise', block=4), pos) == {
      (i, j) for i, j in lower if i // 4 - j // 4 <= 1}
  assert {j for i, j in pairs(MaskSpec('blockwise', block=4), pos) if i == 9} == set(range(4, 10))


def test_bigbird_random_blocks_are_fixed_by_the_seed_and_follow_the_draw():
  pos = np.arange(64)
  spec = MaskSpec('bigbird', block=4, random_blocks=2, seed=7)
  got = pairs(spec, pos)
  assert got == pairs(spec, pos)
  assert got != pairs(MaskSpec('bigbird', block=4, random_blocks=2, seed=8), pos)
  local = pairs(MaskSpec('blockwise', block=4), pos)
  assert local <= got
  for qb in range(16):
    extra = {j // 4 for i, j in got - local if i // 4 == qb}
    drawn = reference_random_blocks(7, qb, 2, qb + 1) - {qb, qb - 1}
    assert extra == drawn                 # whole blocks, exactly the documented draws
    for b in extra:                       # a random block is visible in full (below the diagonal)
      assert all((i, j) in got for i in range(4 * qb, 4 * qb + 4) for j in range(4 * b, 4 * b + 4))
  assert sum(len(reference_random_blocks(7, qb, 2, qb + 1)) for qb in range(2, 16)) > 14


def test_global_and_sink_tokens_are_per_document():
  """In a packed row the first tokens of each document (position < n) are the global ones."""
  qp = np.r_[np.arange(6), np.arange(6)][None]
  seg = np.r_[[1] * 6, [2] * 6][None]
  m = np.asarray(attention.visible(qp, qp, seg, seg, mask=MaskSpec('sinks', window=1,
                                                                   sink_tokens=1)))[0]
  assert {(int(i), int(j)) for i, j in zip(*np.nonzero(m))} == (
      {(i, i) for i in range(12)} | {(i, 0) for i in range(6)} | {(i, 6) for i in range(6, 12)})


# ----------------------------------------------------------------------------------------------
# Tile skipping in the chunked backend.


@pytest.mark.parametrize('spec', [s for s in MASKS.values()] + [
    MaskSpec(causal=False), MaskSpec('bigbird', False, block=3, random_blocks=3, seed=2)])
def test_tile_skipping_never_skips_a_visible_pair(spec):
  rng = np.random.default_rng(11)
  qp = np.stack([np.r_[np.arange(30), np.arange(34)], rng.integers(0, 80, size=64)])
  seg = np.stack([np.r_[[1] * 30, [2] * 34], rng.integers(0, 2, size=64)])
  visits = np.asarray(attention.tile_visits(jnp.asarray(qp), jnp.asarray(qp), jnp.asarray(seg),
                                            jnp.asarray(seg), spec, 8))
  mask = reference_mask(spec, qp, qp, seg, seg, kv_len=64)
  needed = mask.reshape(2, 8, 8, 8, 8).any(axis=(0, 2, 4))
  assert not np.any(needed & ~visits)


def test_tile_skipping_skips_future_distant_and_other_document_tiles():
  pos = jnp.broadcast_to(jnp.arange(64), (1, 64))
  causal = np.asarray(attention.tile_visits(pos, pos, None, None, MaskSpec(), 8))
  np.testing.assert_array_equal(causal, np.tril(np.ones((8, 8), bool)))
  window = np.asarray(attention.tile_visits(pos, pos, None, None, MaskSpec('sliding', window=8), 8))
  np.testing.assert_array_equal(window, np.tri(8, 8, 0, bool) & ~np.tri(8, 8, -2, bool))
  sinks = np.asarray(attention.tile_visits(pos, pos, None, None,
                                           MaskSpec('sinks', window=8, sink_tokens=4), 8))
  assert sinks.sum() == 8 + 7 + 6        # diagonal, the one before it, and the sink tile
  packed = jnp.asarray(np.r_[np.arange(32), np.arange(32)][None])
  seg = jnp.asarray(np.r_[[1] * 32, [2] * 32][None])
  docs = np.asarray(attention.tile_visits(packed, packed, seg, seg, MaskSpec(), 8))
  assert not docs[4:, :4].any()          # the second document never visits the first


def test_chunked_memory_grows_linearly_with_length():
  """Compiled temp memory of forward + backward grows linearly and stays far below T×T."""
  def temp_bytes(backend, t):
    x = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    p = jax.ShapeDtypeStruct((1, t), jnp.int32)
    def loss(q, k, v, pos):
      return attention.attend(q, k, v, q_pos=pos, k_pos=pos, chunk=64, backend=backend).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(x, x, x, p).compile().memory_analysis().temp_size_in_bytes
  chunked = [temp_bytes('chunked', t) for t in (1024, 2048)]
  assert chunked[1] < 2.2 * chunked[0], chunked
  logits = 2 * 2048 * 2048 * 4          # what the xla backend holds at 2048 tokens, at least
  assert chunked[1] * 10 < logits, chunked


# ----------------------------------------------------------------------------------------------
# Accelerator kernels (splash in Pallas interpret mode; cudnn's wrapper around an XLA stand-in).


SPLASH_T = 130                          # padded to splash's 128-token tiles inside
SPLASH_POS = np.stack([np.r_[np.arange(70), np.arange(60)], np.arange(SPLASH_T)])
SPLASH_SEG = np.stack([np.r_[[1] * 70, [2] * 60], np.ones(SPLASH_T, int)])


def test_splash_matches_reference_and_falls_back_when_positions_jump():
  spec, t, packed, seg = MaskSpec(), SPLASH_T, SPLASH_POS, SPLASH_SEG
  q, k, v, _, ct = inputs(3, t, t)
  jumping = packed.copy()
  jumping[1, 50:] += 5                  # a gap in positions: index masks no longer apply
  for qp, expect_kernel in ((packed, True), (jumping, False)):
    assert bool(kernels.index_masks_apply(jnp.asarray(qp), jnp.asarray(qp), jnp.asarray(seg),
                                          jnp.asarray(seg))) == expect_kernel
    out, grads = lcr_forward_and_grads(q, k, v, np.zeros((8, H), np.float32), ct, qp, qp, seg,
                                       seg, backend='splash', spec=spec, chunk=32,
                                       use_bias=False)
    mask = reference_mask(spec, qp, qp, seg, seg)
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(out), reference_attention(*f64, mask), atol=1e-5)
    want = reference_grads(*f64, np.zeros((8, H)), ct, mask, no_bias(mask))
    for got, wanted in zip(grads[:3], want[:3]):
      np.testing.assert_allclose(np.asarray(got), wanted, atol=1e-5)


def test_splash_sliding_window_matches_reference():
  spec = MaskSpec('sliding', window=9)
  q, k, v, _, _ = inputs(6, SPLASH_T, SPLASH_T)
  forward = jax.jit(lambda q, k, v: attention.attend(
      q, k, v, q_pos=SPLASH_POS, k_pos=SPLASH_POS, q_segments=SPLASH_SEG, k_segments=SPLASH_SEG,
      mask=spec, backend='splash'), compiler_options=FAST_COMPILE)
  mask = reference_mask(spec, SPLASH_POS, SPLASH_POS, SPLASH_SEG, SPLASH_SEG)
  want = reference_attention(*(x.astype(np.float64) for x in (q, k, v)), mask)
  np.testing.assert_allclose(np.asarray(forward(q, k, v)), want, atol=1e-5)


def test_cudnn_wrapper_pads_and_folds_the_mask_into_the_bias(monkeypatch):
  """The cudnn backend's mask/bias/padding logic, run through XLA's implementation on CPU."""
  real = jax.nn.dot_product_attention
  seen = {}

  def stand_in(q, k, v, bias=None, *, scale, implementation):
    assert implementation == 'cudnn'
    seen['shapes'] = (q.shape, k.shape, bias.shape, bias.dtype)
    return real(q, k, v, bias=bias, scale=scale, implementation='xla')
  monkeypatch.setattr(kernels.jax.nn, 'dot_product_attention', stand_in)
  q, k, v, _, _ = inputs(4)
  spec = MASKS['sinks']
  out = attention.attend(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), q_pos=POSITIONS,
                         k_pos=POSITIONS, q_segments=SEGMENTS, k_segments=SEGMENTS, mask=spec,
                         bias_fn=positional.alibi_bias(H), backend='cudnn')
  assert seen['shapes'] == ((B, 38, H, D), (B, 38, KV, D), (B, H, 38, 38), jnp.bfloat16)
  bf = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in (q, k, v)]
  alibi = -positional.alibi_slopes(H)[None, :, None, None] * (
      POSITIONS[:, :, None] - POSITIONS[:, None, :])[:, None]
  want = reference_attention(*bf, reference_mask(spec, POSITIONS, POSITIONS, SEGMENTS, SEGMENTS),
                             alibi)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=3e-2)


def test_cudnn_uses_its_causal_mask_only_for_one_document_rows(monkeypatch):
  """Causal, no bias: cuDNN's index mask when each row is one document with positions rising by
  one, the positional mask as a bias array otherwise (XLA's implementation stands in on CPU)."""
  real = jax.nn.dot_product_attention

  def stand_in(q, k, v, bias=None, *, scale, implementation, is_causal=False):
    assert implementation == 'cudnn' and (bias is None) == is_causal
    return real(q, k, v, bias=bias, scale=scale, is_causal=is_causal, implementation='xla')
  monkeypatch.setattr(kernels.jax.nn, 'dot_product_attention', stand_in)
  t = 37                                     # odd: padded to 38 inside
  q, k, v, _, _ = inputs(5, t, t)
  rows = np.tile(np.arange(t), (2, 1))
  one_doc = (rows + np.array([[0], [3]]), np.ones((2, t), int))           # row 1 starts at 3
  packed = (np.stack([rows[0], np.r_[np.arange(20), np.arange(17)]]),
            np.stack([np.ones(t, int), np.r_[[1] * 20, [2] * 17]]))
  for (pos, seg), fast in ((one_doc, True), (packed, False)):
    assert bool(kernels.one_document_per_row(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(seg),
                                             jnp.asarray(seg))) == fast
    out = attention.attend(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), q_pos=pos,
                           k_pos=pos, q_segments=seg, k_segments=seg, backend='cudnn')
    bf = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in (q, k, v)]
    want = reference_attention(*bf, reference_mask(MaskSpec(), pos, pos, seg, seg))
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=3e-2)


# ----------------------------------------------------------------------------------------------
# `auto`, explicit backends, arguments, config.


def call(platform='cpu', dtype='float32', t=1024, s=None, has_bias=False, mask=MaskSpec(),
         head_dim=64, batch=1, heads=8, devices=1):
  return attention.Call(platform=platform, dtype=dtype, batch=batch, heads=heads,
                        head_dim=head_dim, q_len=t, kv_len=s or t, has_bias=has_bias, mask=mask,
                        devices=devices)


@pytest.mark.parametrize('c,expected', [
    (call(t=512), 'cpu_flash'),
    (call(t=16384), 'cpu_flash'),                                      # 256 MiB mask: fits
    (call(t=16384, batch=2), 'chunked'),                              # 512 MiB: does not
    (call(t=512, devices=8), 'xla'),                                  # the kernel is not partitioned
    (call(t=1, s=32768), 'xla'),                                      # a decoding step
    (call(t=16, s=4096), 'cpu_flash'),
    (call(t=512, dtype='bfloat16'), 'xla'),
    (call(t=512, head_dim=8), 'xla'),
    (call(t=512, has_bias=True), 'xla'),
    (call(t=513, has_bias=True), 'chunked'),
    (call(t=512, s=1024, has_bias=True), 'chunked'),
    (call(t=32768, has_bias=True), 'chunked'),
    (call('gpu', 'bfloat16', t=8192, has_bias=True), 'cudnn'),
    (call('gpu', 'float16', t=32768), 'cudnn'),                       # 2 GiB mask: fits
    (call('gpu', 'bfloat16', t=32768, has_bias=True), 'chunked'),    # 16 GiB bias: does not
    (call('gpu', 'float32', t=2048), 'xla'),
    (call('gpu', 'float32', t=16384), 'chunked'),
    (call('gpu', 'bfloat16', head_dim=256), 'xla'),
    (call('tpu', 'bfloat16', t=65536), 'splash'),
    (call('tpu', 'bfloat16', t=65536, mask=MaskSpec('sliding', window=512)), 'splash'),
    (call('tpu', 'bfloat16', t=65536, has_bias=True), 'chunked'),
    (call('tpu', 'bfloat16', t=65536, mask=MaskSpec('sinks', window=64, sink_tokens=4)),
     'chunked'),
    (call('tpu', 'bfloat16', t=512, s=1024), 'xla'),                  # cross-attention
])
def test_auto_choice(c, expected, monkeypatch):
  """The table as on a machine with a C++ compiler (test_cpu_flash covers one without)."""
  monkeypatch.setattr(cpu_flash, 'unavailable', lambda: None)
  assert attention.choose(c)[0] == expected


def test_explicit_backends_refuse_what_they_cannot_run():
  with pytest.raises(ValueError, match='bfloat16/float16'):
    attention.resolve('cudnn', call('gpu', 'float32'))
  with pytest.raises(ValueError, match='no additive bias'):
    attention.resolve('splash', call('tpu', has_bias=True))
  with pytest.raises(ValueError, match='unknown attention backend'):
    attention.resolve('flash2', call())
  assert attention.resolve('auto', call(t=1024, has_bias=True)) == 'chunked'


def test_attend_rejects_contradictory_arguments():
  q, k, v, _, _ = inputs(0)
  kwargs = dict(q_pos=POSITIONS, k_pos=POSITIONS)
  with pytest.raises(ValueError, match='window inside the MaskSpec'):
    attention.attend(q, k, v, window=3, mask=MaskSpec(), **kwargs)
  with pytest.raises(ValueError, match='contradicts'):
    attention.attend(q, k, v, causal=False, mask=MaskSpec(), **kwargs)
  with pytest.raises(ValueError, match='positions'):
    attention.attend(q, k, v, q_pos=POSITIONS[:, :5], k_pos=POSITIONS)


def test_length_scale_is_log_base_training_length():
  got = np.asarray(attention.length_scale(jnp.asarray([[0, 15, 255, 4095]]), 16))
  np.testing.assert_allclose(got, [[1.0, 1.0, 2.0, 3.0]], rtol=1e-6)


@pytest.mark.parametrize('field,overrides', [
    ('model.window', dict(attention='sliding')),
    ('model.window', dict(attention='longformer', window=-1)),
    ('model.sink_tokens', dict(attention='sinks', window=8, sink_tokens=0)),
    ('model.attention_block', dict(attention='blockwise')),
    ('model.attention_block', dict(attention='bigbird')),
    ('model.attention', dict(attention='strided')),
    ('model.attention_chunk', dict(attention_chunk=0)),
    ('model.length_scale_base', dict(length_scaled_logits=True)),
    ('model.attention_backend', dict(attention_backend='cudnn')),
    ('model.attention_backend', dict(attention_backend='splash', pos='alibi')),
    ('model.attention_backend', dict(attention_backend='splash', attention='sinks', window=4)),
    ('model.attention_backend', dict(attention_backend='flash')),
    ('model.attention_backend', dict(attention_backend='cpu_flash', pos='t5')),
    ('model.attention_backend', dict(attention_backend='cpu_flash', dtype='bfloat16')),
    ('model.attention_backend', dict(attention_backend='cpu_flash', d_model=96, num_heads=4)),
])
def test_config_errors_name_the_field(field, overrides):
  with pytest.raises(ConfigError, match=field):
    ModelConfig(**overrides)


def test_config_names_agree_with_the_registries():
  assert set(config.ATTENTION_BACKENDS) == {'auto', *attention.BACKENDS}
  kinds = {attention.mask_from_config(ModelConfig(attention=a, window=4, attention_block=8)).kind
           for a in config.ATTENTION_VARIANTS}
  # 'xl' is Transformer-XL's segment + memory pattern, set by model.memory, not model.attention.
  assert kinds | {'xl'} == set(attention.PATTERNS)


# ----------------------------------------------------------------------------------------------
# The model's modules.


def test_model_variants_give_the_same_logits_with_chunked_and_xla():
  """A sliding-window LM with YaRN and length-scaled logits: chunked equals xla."""
  from lcr.model import TransformerLM
  base = dict(vocab_size=31, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2,
              attention='sliding', window=5, rope_scaling='yarn', rope_factor=2.0,
              rope_original_length=16, attention_chunk=8, length_scaled_logits=True,
              length_scale_base=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 31, size=(2, 41)))
  outs = []
  for backend in ('xla', 'chunked'):
    model = TransformerLM(ModelConfig(**base, attention_backend=backend))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens[:, :8])['params']
    apply = jax.jit(model.apply, compiler_options=FAST_COMPILE)
    outs.append(np.asarray(apply({'params': params}, tokens)))
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)
  assert math.isfinite(outs[1].sum())


def test_cross_attention_module_matches_numpy():
  from lcr.model import CrossAttention
  cfg = ModelConfig(d_model=24, num_heads=3, num_kv_heads=1, attention_backend='chunked',
                    attention_chunk=8)
  rng = np.random.default_rng(2)
  x, ctx = rng.normal(size=(2, 13, 24)), rng.normal(size=(2, 21, 16))
  xs, cs = np.ones((2, 13), int), np.stack([np.r_[[1] * 15, [0] * 6], np.ones(21, int)])
  module = CrossAttention(cfg)
  x32, ctx32 = jnp.asarray(x, jnp.float32), jnp.asarray(ctx, jnp.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(1), x32, ctx32, xs, cs)['params']
  got = jax.jit(module.apply)({'params': params}, x32, ctx32, xs, cs)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
  q = np.einsum('btd,dhk->bthk', x, p['query']['kernel'])
  k = np.einsum('bsd,dhk->bshk', ctx, p['key']['kernel'])
  v = np.einsum('bsd,dhk->bshk', ctx, p['value']['kernel'])
  mask = np.broadcast_to(xs[:, :, None] == cs[:, None, :], (2, 13, 21))
  want = np.einsum('bthk,hkd->btd', reference_attention(q, k, v, mask), p['out']['kernel'])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
