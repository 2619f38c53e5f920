"""Cross-attention that returns its alignment, in three kinds chosen by ``seq2seq.cross_attention``.

* ``softmax``   scaled dot-product multi-head attention (Vaswani et al. 2017 eq. 1), no positions.
* ``location``  location-aware attention (Chorowski et al. 2015 eq. 5–9), per head: additive
                energies e_ij = wᵀ tanh(W s_i + V h_j + U f_ij + b) whose features f_i = F * α_{i−1}
                convolve the head's previous alignment; α_i = softmax(e_i).
* ``monotonic`` monotonic attention (Raffel et al. 2017), per head: p_ij = σ(e_ij) with the energy
                e_ij = g vᵀ tanh(W s_i + V h_j + b) / ‖v‖ + r (eq. 16), r and g initialised to
                ``seq2seq.monotonic_bias`` and ``monotonic_gain``; expected alignments (plus
                pre-sigmoid noise) in training, hard alignments when decoding.

Values and the output projection are the multi-head ones of ``lcr.model.CrossAttention`` (whose
query/key/value/out projections this module reuses). The alignment of step i of location and
monotonic attention depends on step i − 1, so those kinds scan over the decoder steps (the
energies' matmuls stay parallel). In a packed row every query attends only to its own example's
source, and the alignment restarts at each example's first target position. With a ``cache``
layout the memory's projections (computed once per input by the prefill) and the last alignment
live in the ``cache`` collection, batch first, for cached decoding and beam search.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr import layers
from lcr import model as model_lib
from lcr.seq2seq import alignment

MODES = ('train', 'expected', 'hard')   # monotonic: expected + noise | expected | hard


class Memory(NamedTuple):
  """The encoder's output as the decoder reads it."""
  states: jax.Array      # [B, S, D]
  segments: jax.Array    # [B, S] example ids (0 = padding)
  tokens: jax.Array      # [B, S] source tokens (the pointer copies them)


class Kind(NamedTuple):
  memory: Callable[..., jax.Array]              # (module, states [B,S,D]) → what the energies read
  align: Callable[..., tuple[jax.Array, Any]]   # → (weights [B,H,T,S], last alignment state)
  recurrent: bool                               # needs the previous step's alignment


def _energy_width(module) -> int:
  return module.tips.attention_dim or module.cfg.head_dim


def _param(module, name, init, shape):
  return module.param(name, init, shape, jnp.dtype(module.cfg.param_dtype)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# softmax


def _dot_memory(module, states):
  cfg = module.cfg
  return module._project(states, cfg.kv_heads, ('embed', 'kv_heads', 'kv'), 'key')


def _dot_align(module, x, keys, visible, steps, carry):
  """softmax(q·k/√d) per head, GQA groups sharing each key head."""
  cfg = module.cfg
  q = module._project(x, cfg.num_heads, ('embed', 'heads', 'kv'), 'query')
  b, t, h, d = q.shape
  kv = keys.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum('btkgd,bskd->bkgts', q, keys, preferred_element_type=jnp.float32) * d ** -0.5
  logits = logits.reshape(b, h, t, keys.shape[1])
  return alignment.masked_softmax(logits, visible[:, None]), carry


# ----------------------------------------------------------------------------------------------
# additive energies: location-aware and monotonic


def _additive_memory(module, states):
  cfg = module.cfg
  return layers.projection(cfg, (cfg.num_heads, _energy_width(module)), ('embed', 'heads', 'kv'),
                           'energy_memory')(states).astype(jnp.float32)       # V h_j [B,S,H,A]


def _additive_query(module, x):
  cfg = module.cfg
  return layers.projection(cfg, (cfg.num_heads, _energy_width(module)), ('embed', 'heads', 'kv'),
                           'energy_query')(x).astype(jnp.float32)             # W s_i [B,T,H,A]


def _scan(step, carry, init_BxTxHxS, steps, visible_BxTxS, *xs_BxT):
  """Runs ``step(prev, visible_t, *x_t) → (new state, weights_t)`` over the decoder steps.

  The state restarts at ``init`` on each example's first step (position 0) and is kept through
  padding steps (segment 0), so a prefill ends at each row's last real token.
  """
  positions, segments = steps

  def body(state, xs):
    init, pos, seg, vis, *rest = xs
    prev = jnp.where((pos == 0)[:, None, None], init, state)
    new, weights = step(prev, vis, *rest)
    return jnp.where((seg > 0)[:, None, None], new, prev), weights

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  xs = (init_BxTxHxS, positions, segments, visible_BxTxS) + xs_BxT
  carry, weights = jax.lax.scan(body, carry, jax.tree.map(time_major, xs))
  return jnp.moveaxis(weights, 0, 2), carry          # [B, H, T, S]


def _location_align(module, x, memory_energy, visible, steps, carry):
  tips, cfg = module.tips, module.cfg
  h, a, k = cfg.num_heads, _energy_width(module), tips.location_filters
  query = _additive_query(module, x)
  bias = _param(module, 'energy_bias', nn.initializers.zeros, (h, a))
  w = _param(module, 'energy_w', nn.initializers.normal(a ** -0.5), (h, a))
  conv = _param(module, 'location_conv', nn.initializers.normal(tips.location_width ** -0.5),
                (h, k, tips.location_width))
  features = _param(module, 'location_features', nn.initializers.normal(k ** -0.5), (h, k, a))

  def step(alpha_prev, vis, query_t):
    f = alignment.location_features(alpha_prev, conv)                         # [B, H, K, S]
    uf = jnp.einsum('bhks,hka->bsha', f, features)
    hidden = jnp.tanh(query_t[:, None] + memory_energy + uf + bias[None, None])   # [B, S, H, A]
    energy = jnp.einsum('bsha,ha->bhs', hidden, w)
    alpha = alignment.masked_softmax(energy, vis[:, None])
    return alpha, alpha

  init = jnp.broadcast_to(alignment.uniform_visible(visible)[:, :, None], visible.shape[:2] + (h,) + visible.shape[2:])
  return _scan(step, carry, init, steps, visible, query)


def _monotonic_align(module, x, memory_energy, visible, steps, carry):
  tips, cfg = module.tips, module.cfg
  h, a = cfg.num_heads, _energy_width(module)
  query = _additive_query(module, x)
  bias = _param(module, 'energy_bias', nn.initializers.zeros, (h, a))
  v = _param(module, 'energy_v', nn.initializers.normal(a ** -0.5), (h, a))
  gain = _param(module, 'energy_gain', nn.initializers.constant(tips.monotonic_gain), (h,))
  r = _param(module, 'energy_r', nn.initializers.constant(tips.monotonic_bias), (h,))
  # Raffel et al. 2017 eq. 16: g vᵀ tanh(W s + V h + b) / ‖v‖ + r, all steps at once.
  normed_v = gain[:, None] * v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  hidden = jnp.tanh(query[:, :, None] + memory_energy[:, None] + bias[None, None, None])  # [B,T,S,H,A]
  energy = jnp.einsum('btsha,ha->bths', hidden, normed_v) + r[None, None, :, None]
  if module.mode == 'train' and tips.monotonic_noise > 0:
    energy = energy + tips.monotonic_noise * jax.random.normal(module.make_rng('noise'), energy.shape)
  first = alignment.first_visible(visible)[:, :, None]                          # α_0, [B,T,1,S]
  first = jnp.broadcast_to(first, visible.shape[:2] + (h,) + visible.shape[2:])
  if module.mode == 'hard':
    step = lambda prev, vis, e: (lambda al: (al, al))(alignment.monotonic_hard_step(prev, e, vis[:, None]))
    return _scan(step, carry, first, steps, visible, energy)

  def expected(log_prev, vis, e):
    log_alpha = alignment.monotonic_expected_step(log_prev, e, vis[:, None])
    return log_alpha, jnp.exp(log_alpha)
  log_first = jnp.where(first > 0, 0.0, alignment.NEG)
  return _scan(expected, carry, log_first, steps, visible, energy)


KINDS: dict[str, Kind] = {
    'softmax': Kind(_dot_memory, _dot_align, recurrent=False),
    'location': Kind(_additive_memory, _location_align, recurrent=True),
    'monotonic': Kind(_additive_memory, _monotonic_align, recurrent=True),
}


class AlignedCrossAttention(model_lib.CrossAttention):
  """Cross-attention of decoder states x [B,T,D] over the encoder memory → (out [B,T,D], α [B,H,T,S]).

  ``memory`` is None in a cached decoding step (the cache holds its projections); ``mode`` is one
  of MODES (monotonic only: 'train' adds noise from the 'noise' rng).
  """
  tips: Any = None
  mode: str = 'expected'

  def _cached(self, name, value=None):
    var = self.variable('cache', name, lambda: value)
    if value is not None:
      var.value = value
    return var

  @nn.compact
  def __call__(self, x_BxTxD, memory: Memory | None, positions_BxT, segments_BxT, *,
               fresh_cache: bool = False):
    cfg, kind = self.cfg, KINDS[self.tips.cross_attention]
    if memory is not None:
      keys = kind.memory(self, memory.states)
      values = self._project(memory.states, cfg.kv_heads, ('embed', 'kv_heads', 'kv'), 'value')
      source_segments = memory.segments
    if self.cache is not None:   # the prefill stores the memory's projections; steps read them
      stored = (keys, values, source_segments) if memory is not None else (None,) * 3
      keys, values, source_segments = (self._cached(n, v).value for n, v in zip(
          ('memory_keys', 'memory_values', 'memory_segments'), stored))
    b, s = source_segments.shape
    visible = ((segments_BxT[:, :, None] == source_segments[:, None, :])
               & (segments_BxT[:, :, None] > 0))                               # [B, T, S]
    state = None
    if kind.recurrent:
      zeros = jnp.zeros((b, cfg.num_heads, s), jnp.float32)
      state = (self._cached('alignment', zeros if fresh_cache or memory is not None else None)
               if self.cache is not None else None)
      carry = zeros if state is None else state.value
    else:
      carry = None
    weights, carry = kind.align(self, x_BxTxD, keys, visible, (positions_BxT, segments_BxT), carry)
    if state is not None:
      state.value = carry
    kv = values.shape[2]
    h, t = cfg.num_heads, x_BxTxD.shape[1]
    grouped = weights.reshape(b, kv, h // kv, t, s).astype(values.dtype)
    out = jnp.einsum('bkgts,bskd->btkgd', grouped, values).reshape(b, t, h, cfg.head_dim)
    return self._output(out), weights
