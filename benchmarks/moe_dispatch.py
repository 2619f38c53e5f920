"""MoE dispatch and combine: sort/gather (lcr.moe) against one-hot einsums (GShard, Switch).

    python benchmarks/moe_dispatch.py                       # the default grid, one CPU device
    python benchmarks/moe_dispatch.py --batch=16 --lengths=256 --d_model=256 --experts=8

Times, per (B, T, D, E, k, capacity factor), the forward and backward pass of dispatch → a
per-slot tanh (standing in for the experts, whose matmuls are the same either way) → combine,
and of the whole MoE layer (router, experts, auxiliary losses), with each implementation. Both are
first checked to give the same outputs. Prints a table and one JSON object per measurement.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import best_seconds  # noqa: E402
from lcr import moe  # noqa: E402
from lcr.config import ModelConfig, MoeConfig  # noqa: E402

_BATCH = flags.DEFINE_integer('batch', 8, 'rows (routing groups)')
_LENGTHS = flags.DEFINE_list('lengths', ['64', '256'], 'tokens per row')
_D = flags.DEFINE_integer('d_model', 128, 'model width')
_EXPERTS = flags.DEFINE_list('experts', ['4', '8'], 'number of experts')
_TOP_K = flags.DEFINE_list('top_k', ['1', '2'], 'experts per token')
_FACTORS = flags.DEFINE_list('capacity_factors', ['1.25', '0'], 'capacity factors (0 = dropless)')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed runs; the best is reported')


def dispatch_einsum(x_BxTxD, experts_BxTxK, slots_BxTxK, num_experts, cap):
  """[B, E, C, D] by a one-hot dispatch tensor [B, T, E, C] (Lepikhin et al. 2020, Algorithm 1)."""
  dt = x_BxTxD.dtype
  mask = jnp.einsum('btke,btkc->btec', jax.nn.one_hot(experts_BxTxK, num_experts, dtype=dt),
                    jax.nn.one_hot(slots_BxTxK, cap, dtype=dt))   # slots >= cap: a zero row
  return jnp.einsum('btec,btd->becd', mask, x_BxTxD)


def combine_einsum(out_BxExCxD, experts_BxTxK, slots_BxTxK, gates_BxTxK):
  """[B, T, D] by a one-hot combine tensor [B, T, E, C] holding the gates."""
  _, e, cap, _ = out_BxExCxD.shape
  dt = out_BxExCxD.dtype
  weights = jnp.einsum('btk,btke,btkc->btec', gates_BxTxK.astype(dt),
                       jax.nn.one_hot(experts_BxTxK, e, dtype=dt),
                       jax.nn.one_hot(slots_BxTxK, cap, dtype=dt))
  return jnp.einsum('btec,becd->btd', weights, out_BxExCxD)


IMPLEMENTATIONS = {'sort_gather': (moe.dispatch, moe.combine),
                   'einsum': (dispatch_einsum, combine_einsum)}


def dispatch_combine_fn(impl: str, e: int, cap: int):
  to_experts, from_experts = IMPLEMENTATIONS[impl]

  def loss(x, gates, experts, slots):
    out = jnp.tanh(to_experts(x, experts, slots, e, cap))
    return jnp.sum(from_experts(out, experts, slots, gates) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def layer_fn(impl: str, cfg: ModelConfig, x):
  """Forward and backward of the whole MoE layer with the dispatch of ``impl``."""
  layer = moe.MoeFfn(cfg)
  params = jax.jit(layer.init)(jax.random.key(0), x)['params']

  def loss(p, x):
    saved = moe.dispatch, moe.combine
    moe.dispatch, moe.combine = IMPLEMENTATIONS[impl]
    try:
      y, aux = layer.apply({'params': p}, x, mutable=['losses'])
    finally:
      moe.dispatch, moe.combine = saved
    return jnp.sum(y ** 2) + sum(jnp.sum(v) for v in jax.tree.leaves(aux))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def measure(b: int, t: int, d: int, e: int, k: int, cf: float) -> list[dict]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(b, t, e)), jnp.float32)
  routing = moe.route(logits, k, renormalize=k > 1)
  slots = moe.assign_slots(routing.experts, e)
  moe_cfg = MoeConfig(num_experts=e, top_k=k, capacity_factor=cf, renormalize=k > 1)
  cap = moe.capacity(t, moe_cfg)
  cfg = ModelConfig(d_model=d, num_heads=4, ffn='moe', moe=moe_cfg)
  sync = jax.block_until_ready
  outs, rows = {}, []
  for impl in IMPLEMENTATIONS:
    fn = dispatch_combine_fn(impl, e, cap)
    outs[impl] = fn(x, routing.gates, routing.experts, slots)
    seconds = best_seconds(fn, (x, routing.gates, routing.experts, slots), _REPEATS.value, sync)
    layer, params = layer_fn(impl, cfg, x)
    layer_seconds = best_seconds(layer, (params, x), _REPEATS.value, sync)
    rows.append(dict(impl=impl, batch=b, seq_len=t, d_model=d, experts=e, top_k=k,
                     capacity_factor=cf, capacity=cap, dispatch_combine_ms=1e3 * seconds,
                     layer_ms=1e3 * layer_seconds))
  (va, ga), (vb, gb) = outs.values()
  np.testing.assert_allclose(va, vb, rtol=1e-4)
  for a, c in zip(ga, gb):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
  return rows


def main(argv):
  del argv
  print(f'device: {jax.devices()[0].device_kind}; forward + backward, best of {_REPEATS.value}')
  print(f'{"B":>3}{"T":>5}{"D":>5}{"E":>3}{"k":>3}{"cf":>6}{"C":>5}'
        f'{"gather ms":>11}{"einsum ms":>11}{"layer: gather":>15}{"einsum":>8}')
  rows = []
  for t in map(int, _LENGTHS.value):
    for e in map(int, _EXPERTS.value):
      for k in map(int, _TOP_K.value):
        for cf in map(float, _FACTORS.value):
          g, s = measure(_BATCH.value, t, _D.value, e, k, cf)
          rows += [g, s]
          print(f'{g["batch"]:>3}{t:>5}{g["d_model"]:>5}{e:>3}{k:>3}{cf:>6.2f}{g["capacity"]:>5}'
                f'{g["dispatch_combine_ms"]:>11.2f}{s["dispatch_combine_ms"]:>11.2f}'
                f'{g["layer_ms"]:>15.2f}{s["layer_ms"]:>8.2f}', flush=True)
  for row in rows:
    print(json.dumps(row))


if __name__ == '__main__':
  app.run(main)
