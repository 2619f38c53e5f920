"""The batched matmuls of attention in JAX (and PyTorch, when installed) on this machine.

    python benchmarks/attention_matmuls.py                       # model c's shapes: 96 × [256, 64]
    python benchmarks/attention_matmuls.py --batch=64 --length=256 --head_dim=64

Times q·kᵀ ([N, T, D] × [N, S, D] → [N, T, S]) and p·v ([N, T, S] × [N, S, D] → [N, T, D]) in
float32, N = batch × heads, best of several runs, and prints GFLOP/s for each: the products that
dominate the ``xla`` attention backend's cost on CPU (see README, Throughput).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from timing import best_seconds

_BATCH = flags.DEFINE_integer('batch', 96, 'N: batch × heads (model c: 16 × 6)')
_LENGTH = flags.DEFINE_integer('length', 256, 'T = S')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'D')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'timed runs of 5 calls; the best is kept')


def main(argv):
  del argv
  n, t, d = _BATCH.value, _LENGTH.value, _HEAD_DIM.value
  rng = np.random.default_rng(0)
  q, k = (rng.normal(size=(n, t, d)).astype(np.float32) for _ in range(2))
  p = rng.normal(size=(n, t, t)).astype(np.float32)
  flop = 2 * n * t * t * d
  products = {'q·kᵀ': ('ntd,nsd->nts', q, k), 'p·v': ('nts,nsd->ntd', p, k)}
  rows = []
  for name, (spec, a, b) in products.items():
    fn = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
    seconds = best_seconds(fn, (jnp.asarray(a), jnp.asarray(b)), _REPEATS.value,
                           jax.block_until_ready)
    rows.append(dict(framework=f'jax {jax.__version__}', product=name, seconds=seconds,
                     gflop_per_s=flop / seconds / 1e9))
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    torch = None
  if torch is not None:
    for name, (spec, a, b) in products.items():
      fn = lambda x, y, spec=spec: torch.einsum(spec, x, y)
      seconds = best_seconds(fn, (torch.from_numpy(a), torch.from_numpy(b)), _REPEATS.value,
                             lambda out: None)
      rows.append(dict(framework=f'torch {torch.__version__}', product=name, seconds=seconds,
                       gflop_per_s=flop / seconds / 1e9))
  print(f'{n} × [{t}, {d}] float32 on {jax.devices()[0].device_kind}')
  for row in rows:
    print(f'{row["framework"]:<22}{row["product"]:<8}{row["seconds"] * 1e3:8.2f} ms'
          f'{row["gflop_per_s"]:8.1f} GFLOP/s')
  for row in rows:
    print(json.dumps(row))


if __name__ == '__main__':
  app.run(main)
