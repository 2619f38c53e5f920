"""The timing loop the benchmark scripts share."""

from __future__ import annotations

import time


def best_seconds(fn, args, repeats: int, sync, calls: int = 5) -> float:
  """Seconds per call of ``fn(*args)``: the best of ``repeats`` runs of ``calls`` calls each, after
  one warm-up call; ``sync(out)`` waits for the last result (jax.block_until_ready, or a no-op)."""
  sync(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    sync(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return best
