"""Mixture-of-experts FFN (``model.ffn='moe'``): float32 top-k router, capacity, dispatch and
combine, auxiliary losses. Details and conventions: docs/moe_and_deepnorm.md.

Each sequence (batch row) is one routing group (GShard's G, Lepikhin et al. 2020 §2.2): expert
capacity C = min(T, ceil(k·T/E · capacity_factor)) slots per expert and row, or C = T when dropless.
Slots are filled in priority order: token by token along the sequence, each token's choices in
rank order (1st, then 2nd, ...). An assignment that finds its expert's C slots taken is dropped: it
adds nothing, and the residual carries the token on. Because no later token can take an earlier
token's slot, which tokens are dropped never depends on the future: the MoE layer stays causal.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr import layers
from lcr.config import ModelConfig, MoeConfig


def capacity(tokens: int, moe: MoeConfig) -> int:
  """Slots per expert for a group of ``tokens``: ceil(k·tokens/E · cf), at most ``tokens``."""
  if moe.dropless:
    return tokens
  return min(tokens, math.ceil(moe.top_k * tokens / moe.num_experts * moe.capacity_factor))


class Routing(NamedTuple):
  probs: jax.Array      # [B, T, E] float32 softmax of the router logits
  experts: jax.Array    # [B, T, k] int32, each token's top-k experts, best first
  gates: jax.Array      # [B, T, k] float32 weights of their outputs


def route(logits_BxTxE: jax.Array, top_k: int, renormalize: bool) -> Routing:
  """Top-k of the softmax; renormalised gates are divided by their sum (Mixtral), else the
  probabilities themselves (Switch: p_i(x) · E_i(x), Fedus et al. 2021 eq. 2)."""
  probs = jax.nn.softmax(logits_BxTxE.astype(jnp.float32), axis=-1)
  gates, experts = jax.lax.top_k(probs, top_k)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return Routing(probs, experts.astype(jnp.int32), gates)


def assign_slots(experts_BxTxK: jax.Array, num_experts: int) -> jax.Array:
  """[B, T, k] slot of each assignment in its expert: how many assignments of the same row come
  before it in priority order (position-major, then choice rank). Slot >= capacity = dropped."""
  b, t, k = experts_BxTxK.shape
  one_hot = jax.nn.one_hot(experts_BxTxK.reshape(b, t * k), num_experts, dtype=jnp.int32)
  earlier = jnp.cumsum(one_hot, axis=1) - one_hot
  return jnp.sum(earlier * one_hot, axis=-1).reshape(b, t, k)


def balance_loss(probs_BxTxE: jax.Array, experts_BxTxK: jax.Array) -> jax.Array:
  """Switch eq. 4, N·Σ_i f_i·P_i over all tokens of the batch; 1 for perfectly balanced routing.

  f_i: the fraction of the k·(tokens) assignments that chose expert i, before capacity (so Σf = 1);
  P_i: the mean router probability of expert i. f carries no gradient; P does.
  """
  num_experts = probs_BxTxE.shape[-1]
  chosen = jax.nn.one_hot(experts_BxTxK, num_experts, dtype=jnp.float32)   # [B, T, k, E]
  f = jnp.mean(chosen, axis=(0, 1, 2))
  p = jnp.mean(probs_BxTxE, axis=(0, 1))
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def z_loss(logits_BxTxE: jax.Array) -> jax.Array:
  """ST-MoE eq. 5 (Zoph et al. 2022): mean over tokens of logsumexp(router logits)²."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxTxE.astype(jnp.float32), axis=-1)))


# ----------------------------------------------------------------------------------------------
# Dispatch and combine by sort and gather. The alternative, GShard's one-hot dispatch and combine
# tensors [B, T, E, C] contracted by einsum, costs B·T·E·C·D multiply-adds each way instead of
# B·E·C·D copies; it lives in benchmarks/moe_dispatch.py, which checks that both agree and times
# them (forward + backward, B = 8, D = 128, one CPU device of a shared 2-core machine, load ≈ 10):
#
#   T    E  k  cf    C   | dispatch+combine ms    | whole MoE layer ms
#                        | sort/gather   einsum   | sort/gather   einsum
#   64   4  1  1.25  20  |    0.22        2.37    |     8.1        20.2
#   64   4  2  1.25  40  |    0.58        1.89    |    14.1        26.3
#   64   8  2  1.25  20  |    0.44        2.02    |    15.0        38.3
#   64   8  2  0     64  |    0.60       10.90    |   179.0       220.8
#   256  4  1  1.25  80  |    2.07       15.12    |    43.2        50.5
#   256  4  2  1.25  160 |    4.78       43.01    |   153.6       491.8
#   256  8  2  1.25  80  |    1.93       54.49    |   124.9       224.7
#   256  8  2  0     256 |    4.30      298.26    |   606.9       837.6
#
# Sort/gather was faster in every dispatch+combine measurement of the grid (3–90×) and for the
# whole layer in 13 of its 16 settings (the other three, all dropless, within the machine's noise),
# so it is the one kept.


def slot_tokens(experts_BxTxK: jax.Array, num_experts: int, cap: int) -> jax.Array:
  """[B, E·C] the token that fills each slot (expert-major), or T where the slot stays empty.

  A stable sort of the row's assignments by expert keeps priority order within each expert, so the
  c-th entry of expert e's run fills slot c.
  """
  b, t, k = experts_BxTxK.shape
  flat = experts_BxTxK.reshape(b, t * k)
  order = jnp.argsort(flat, axis=1, stable=True)                           # [B, T·k]
  counts = jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.int32), axis=1)   # [B, E]
  starts = jnp.cumsum(counts, axis=1) - counts
  c = jnp.arange(cap, dtype=jnp.int32)[None, None, :]
  source = jnp.minimum(starts[:, :, None] + c, t * k - 1).reshape(b, num_experts * cap)
  token = jnp.take_along_axis(order, source, axis=1) // k
  filled = (c < counts[:, :, None]).reshape(b, num_experts * cap)
  return jnp.where(filled, token, t)


def dispatch(x_BxTxD: jax.Array, experts_BxTxK: jax.Array, slots_BxTxK: jax.Array,
             num_experts: int, cap: int) -> jax.Array:
  """[B, E, C, D] expert inputs: each kept assignment's token in its slot, zeros in empty slots."""
  b, _, d = x_BxTxD.shape
  del slots_BxTxK   # the sort reproduces assign_slots' order
  index = slot_tokens(experts_BxTxK, num_experts, cap)
  padded = jnp.concatenate([x_BxTxD, jnp.zeros((b, 1, d), x_BxTxD.dtype)], axis=1)
  return jnp.take_along_axis(padded, index[:, :, None], axis=1).reshape(b, num_experts, cap, d)


def combine(out_BxExCxD: jax.Array, experts_BxTxK: jax.Array, slots_BxTxK: jax.Array,
            gates_BxTxK: jax.Array) -> jax.Array:
  """[B, T, D] Σ_j gate_j · (expert output in assignment j's slot); dropped ones add nothing."""
  b, e, cap, d = out_BxExCxD.shape
  t, k = experts_BxTxK.shape[1:]
  kept = slots_BxTxK < cap
  index = jnp.where(kept, experts_BxTxK * cap + slots_BxTxK, e * cap).reshape(b, t * k)
  padded = jnp.concatenate([out_BxExCxD.reshape(b, e * cap, d),
                            jnp.zeros((b, 1, d), out_BxExCxD.dtype)], axis=1)
  picked = jnp.take_along_axis(padded, index[:, :, None], axis=1).reshape(b, t, k, d)
  return jnp.einsum('btkd,btk->btd', picked, gates_BxTxK.astype(picked.dtype))


# ----------------------------------------------------------------------------------------------
# The layer.


class MoeFfn(layers.Ffn):
  """Top-k routed experts, each an FFN of kind ``moe.expert_ffn`` (Fedus et al. 2021; Lepikhin et
  al. 2020), sharded over the 'expert' logical axis."""

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg, moe = self.cfg, self.cfg.moe
    e, cap = moe.num_experts, capacity(x_BxTxD.shape[1], moe)
    logits = self._router_logits(x_BxTxD)
    routing = route(logits, moe.top_k, moe.renormalize)
    slots = assign_slots(routing.experts, e)
    expert_in = dispatch(x_BxTxD, routing.experts, slots, e, cap)
    expert_in = nn.with_logical_constraint(expert_in, ('batch', None, None, 'embed'))
    # GShard's all-to-all: from rows split over (data, expert) to experts split over 'expert'.
    expert_out = self._experts(jnp.swapaxes(expert_in, 0, 1))
    expert_out = nn.with_logical_constraint(jnp.swapaxes(expert_out, 0, 1),
                                            ('batch', None, None, 'embed'))
    y = combine(expert_out, routing.experts, slots, routing.gates)
    self._report(logits, routing, slots, cap)
    return y.astype(x_BxTxD.dtype)

  def _router_logits(self, x_BxTxD: jax.Array) -> jax.Array:
    """[B, T, E] float32 logits; router input × U(1 − ε, 1 + ε) in training (Switch §2.4)."""
    moe = self.cfg.moe
    x = x_BxTxD.astype(jnp.float32)
    if moe.jitter and not self.deterministic:
      x = x * jax.random.uniform(self.make_rng('dropout'), x.shape, jnp.float32,
                                 1.0 - moe.jitter, 1.0 + moe.jitter)
    # Switch §2.4: a truncated normal of variance 0.1/fan_in (the reduced scale) for stability.
    init = nn.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal')
    kernel = self.param('router', nn.with_logical_partitioning(init, ('embed', None)),
                        (x.shape[-1], moe.num_experts), jnp.float32)
    return jnp.einsum('btd,de->bte', x, kernel)

  def _kernel(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
    """[E, fan_in, fan_out]: each expert's kernel initialised like the dense FFN's (with
    DeepNorm's β where it applies)."""
    init = layers.xavier_uniform(layers.init_scale(self.cfg, name), batch_axis=(0,))
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(self.cfg.param_dtype))

  def _experts(self, x_ExBxCxD: jax.Array) -> jax.Array:
    """Every expert's FFN on its slots: [E, B, C, D] → [E, B, C, D]."""
    cfg, kind = self.cfg, self.cfg.moe.expert_ffn
    e, b, cap, d = x_ExBxCxD.shape
    h_dim, dt = cfg.hidden_dim, jnp.dtype(cfg.dtype)
    x = nn.with_logical_constraint(x_ExBxCxD, ('expert', 'batch', None, 'embed'))
    x = x.reshape(e, b * cap, d)   # one 2-D matmul per expert (see lcr.matmul_layout)

    def matmul(v, name, shape, axes):
      return jnp.einsum('end,edh->enh', v, self._kernel(name, shape, axes).astype(dt))

    act = layers.ACTIVATIONS[kind]
    if kind in layers.GATED:
      h = act(matmul(x, 'wi_gate', (e, d, h_dim), ('expert', 'embed', 'mlp')))
      h = h * matmul(x, 'wi_up', (e, d, h_dim), ('expert', 'embed', 'mlp'))
    else:
      h = act(matmul(x, 'wi', (e, d, h_dim), ('expert', 'embed', 'mlp')))
    h = nn.with_logical_constraint(h, ('expert', 'batch', 'mlp'))
    y = matmul(h, 'wo', (e, h_dim, d), ('expert', 'mlp', 'embed')).reshape(e, b, cap, d)
    return nn.with_logical_constraint(y, ('expert', 'batch', None, 'embed'))

  def _report(self, logits: jax.Array, routing: Routing, slots: jax.Array, cap: int) -> None:
    """Sows the weighted auxiliary losses (added to the training loss) and the metrics to log."""
    moe = self.cfg.moe
    balance, router_z = balance_loss(routing.probs, routing.experts), z_loss(logits)
    self.sow(layers.AUX_LOSSES, 'balance_loss', moe.balance_coef * balance)
    self.sow(layers.AUX_LOSSES, 'router_z_loss', moe.z_coef * router_z)
    chosen = jax.nn.one_hot(routing.experts, moe.num_experts, dtype=jnp.float32)
    load = jnp.sum(chosen, axis=(0, 1, 2))   # assignments per expert, before the capacity limit
    for name, value in (('balance_loss', balance), ('z_loss', router_z),
                        ('dropped_fraction', jnp.mean((slots >= cap).astype(jnp.float32))),
                        ('expert_load', jnp.max(load) / jnp.mean(load))):
      self.sow(layers.MODEL_METRICS, name, jax.lax.stop_gradient(value))


layers.FFNS['moe'] = MoeFfn


# ----------------------------------------------------------------------------------------------
# What the trainer logs and counts.


def _layer_values(keys: list[str], value: jax.Array, every: int) -> list[tuple[int, jax.Array]]:
  """(layer index, scalar) pairs of one sown leaf: one layer, or a stack over scanned layers."""
  if (m := re.fullmatch(r'layer_(\d+)', keys[0])):
    return [(int(m.group(1)), value)]
  if keys[0] == 'layers':   # nn.scan: [layers] stacked; with groups, [groups] per block_j
    m = re.fullmatch(r'block_(\d+)', keys[1]) if len(keys) > 1 else None
    offset, period = (int(m.group(1)), every) if m else (0, 1)
    return [(g * period + offset, value[g]) for g in range(value.shape[0])]
  raise ValueError(f'unexpected path {keys} in the sown metrics')


def summarize(sown_metrics: Any, cfg: ModelConfig | None) -> dict[str, jax.Array]:
  """metrics.jsonl fields from what the MoE layers sowed: the balance loss, z-loss and dropped
  fraction (unweighted, mean over MoE layers) and each MoE layer's expert load (max / mean)."""
  per_name: dict[str, list[tuple[int, jax.Array]]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(sown_metrics):
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    every = cfg.moe.every if cfg is not None else 1
    per_name.setdefault(keys[-1], []).extend(_layer_values(keys[:-1], leaf, every))
  if not per_name:
    return {}
  out = {f'moe_{name}': jnp.mean(jnp.stack([v for _, v in per_name[name]]))
         for name in ('balance_loss', 'z_loss', 'dropped_fraction')}
  out.update({f'moe_expert_load_layer_{i}': v for i, v in sorted(per_name['expert_load'])})
  return out


def expert_params(cfg: ModelConfig) -> tuple[int, int]:
  """(parameters in all experts of all MoE layers, the part a token uses: k experts per layer)."""
  if cfg.ffn != 'moe':
    return 0, 0
  matrices = 3 if cfg.moe.expert_ffn in layers.GATED else 2
  per_expert = matrices * cfg.d_model * cfg.hidden_dim
  moe_layers = sum(cfg.ffn_kind(i) == 'moe' for i in range(cfg.num_layers))
  return (moe_layers * cfg.moe.num_experts * per_expert, moe_layers * cfg.moe.top_k * per_expert)


def active_params(cfg: ModelConfig, num_params: int) -> int:
  """Parameters a token passes through: all but the experts it is not routed to."""
  total, active = expert_params(cfg)
  return num_params - total + active
