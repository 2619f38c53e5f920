"""One attention layer, forward and forward + backward, per backend (and PyTorch, when installed).

    python benchmarks/attention_backends.py                        # model c: B 16, T 256, 6 × 64
    python benchmarks/attention_backends.py --shape=12,64,4,32     # model a
    python benchmarks/attention_backends.py --backends=cpu_flash,xla,chunked --causal=false

Causal self-attention of q, k, v [B, T, H, D] float32 (no logit bias) through
``lcr.attention.attend`` with each backend, jitted, best of several runs; PyTorch's
``scaled_dot_product_attention`` on the same inputs for comparison. Prints milliseconds and the
GFLOP/s of the visible work (the causal half of 4·B·H·T²·D for the forward pass, 2.5× that for
forward + backward).
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

from lcr import attention  # noqa: E402
from timing import best_seconds  # noqa: E402

_SHAPE = flags.DEFINE_list('shape', ['16', '256', '6', '64'], 'B, T, H, D')
_BACKENDS = flags.DEFINE_list('backends', ['cpu_flash', 'xla', 'chunked'], 'lcr backends to time')
_CAUSAL = flags.DEFINE_bool('causal', True, 'causal mask (else every key is visible)')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'timed runs of 10 calls; the best is kept')


def best_ms(fn, sync, repeats: int) -> float:
  return best_seconds(fn, (), repeats, sync, calls=10) * 1e3


def main(argv):
  del argv
  b, t, h, d = (int(x) for x in _SHAPE.value)
  causal = _CAUSAL.value
  rng = np.random.default_rng(0)
  q, k, v, ct = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(4))
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  visible_fraction = (t + 1) / (2 * t) if causal else 1.0
  flop = 4 * b * h * t * t * d * visible_fraction
  rows = []
  for backend in _BACKENDS.value:
    def loss(q, k, v, backend=backend):
      out = attention.attend(q, k, v, q_pos=pos, k_pos=pos, causal=causal, backend=backend)
      return jnp.sum(out * ct)
    forward = jax.jit(lambda q, k, v, backend=backend: attention.attend(
        q, k, v, q_pos=pos, k_pos=pos, causal=causal, backend=backend))
    both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    args = [jnp.asarray(x) for x in (q, k, v)]
    rows.append(dict(framework=f'lcr {backend}',
                     forward_ms=best_ms(lambda: forward(*args), jax.block_until_ready,
                                        _REPEATS.value),
                     forward_backward_ms=best_ms(lambda: both(*args), jax.block_until_ready,
                                                 _REPEATS.value)))
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    torch = None
  if torch is not None:
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_()
                  for x in (q, k, v))
    tct = torch.from_numpy(ct.transpose(0, 2, 1, 3).copy())
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_forward():
      with torch.no_grad():
        return sdpa(tq, tk, tv, is_causal=causal)

    def torch_both():
      (sdpa(tq, tk, tv, is_causal=causal) * tct).sum().backward()

    rows.append(dict(framework=f'torch {torch.__version__} sdpa',
                     forward_ms=best_ms(torch_forward, lambda out: None, _REPEATS.value),
                     forward_backward_ms=best_ms(torch_both, lambda out: None, _REPEATS.value)))
  print(f'B {b}, T {t}, {h} heads of {d}, {"causal" if causal else "full"}, float32, '
        f'{os.cpu_count()} CPU threads')
  print(f'{"":<28}{"forward":>10}{"GFLOP/s":>9}{"fwd+bwd":>10}{"GFLOP/s":>9}')
  for row in rows:
    row.update(forward_gflop_per_s=flop / row['forward_ms'] / 1e6,
               forward_backward_gflop_per_s=2.5 * flop / row['forward_backward_ms'] / 1e6)
    print(f'{row["framework"]:<28}{row["forward_ms"]:>8.2f}ms{row["forward_gflop_per_s"]:>9.0f}'
          f'{row["forward_backward_ms"]:>8.2f}ms{row["forward_backward_gflop_per_s"]:>9.0f}')
  for row in rows:
    print(json.dumps(row))


if __name__ == '__main__':
  app.run(main)
