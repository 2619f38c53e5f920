"""Training throughput of lcr's jitted train step on GPT-2-style models a, b, c, and b_moe.

    python benchmarks/train_throughput.py                 # a, b, c, on the default device
    python benchmarks/train_throughput.py --configs=a --steps=50
    python benchmarks/train_throughput.py --configs=b,b_moe --capacity_factors=1.0,1.25
    python benchmarks/train_throughput.py --compare_layouts   # also without lcr.matmul_layout
    python benchmarks/train_throughput.py --skip_attention    # also with attention replaced by q+k+v
    python benchmarks/train_throughput.py --attention_backends=cpu_flash,xla   # one run per backend
    python benchmarks/train_throughput.py --configs=a --batch_size=1            # other batch sizes

Prints a table and one JSON object per run: tokens/s, FLOP/s counted as 6·N + 6·L·T·D per token
(N parameters, L layers, T sequence length, D width), and that as a fraction of this machine's
float32 matmul peak, measured (chained square matmuls) next to each run (and of the vendor peak,
i.e. MFU, on a GPU or TPU whose peak is known). Models: learned positions, GELU MLP, tied
embeddings, a 128-symbol vocabulary, float32, one device. ``b_moe`` is model b with every FFN a
mixture of 8 GELU experts of width 512, top-2: the parameters a token passes through are b's (plus
a 256×8 router per layer); N counts those active parameters, and the MoE rows add the fraction of
routing assignments dropped by the capacity limit (random tokens, the initial router).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcr import attention  # noqa: E402
from lcr import config as C  # noqa: E402
from lcr import metrics, moe, sharding, step  # noqa: E402
from lcr.data.config import DataConfig  # noqa: E402

#                (layers, d_model, heads, seq_len, batch)
MODELS = {'a': (4, 128, 4, 64, 12), 'b': (4, 256, 4, 256, 16), 'c': (6, 384, 6, 256, 16),
          'b_moe': (4, 256, 4, 256, 16),
          # Model b at long lengths, 8192 tokens per step.
          'b2k': (4, 256, 4, 2048, 4), 'b8k': (4, 256, 4, 8192, 1)}
# Mixture-of-experts models: (ffn_dim of each expert, MoeConfig fields besides capacity_factor).
MOE_MODELS = {'b_moe': (512, dict(num_experts=8, top_k=2, renormalize=True))}

_CONFIGS = flags.DEFINE_list('configs', ['a', 'b', 'c'], 'which of MODELS to run (a, b, c; b_moe; b2k, b8k)')
_STEPS = flags.DEFINE_integer('steps', 10, 'timed steps per config (after warmup)')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed runs per config; the best is reported')
_COMPARE = flags.DEFINE_bool('compare_layouts', False, 'also time the step with the dense layers '
                             'as the model writes them ([B, T, D] matmuls), without lcr.matmul_layout')
_BACKENDS = flags.DEFINE_list('attention_backends', ['auto'], 'model.attention_backend of each '
                              'timed run (auto: cpu_flash on a CPU with a C++ compiler)')
_SKIP = flags.DEFINE_bool('skip_attention', False, 'also time the step with softmax attention '
                          'replaced by q + k + v (all projections kept): what the rest of the step costs')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'rows per step instead of the model\'s (0: the '
                              'model\'s): fixed per-step costs against per-row ones')
_FACTORS = flags.DEFINE_list('capacity_factors', ['1.25'], 'moe.capacity_factor of each MoE run '
                             '(0 = dropless)')


def matmul_peak(sizes=(1024, 2048), repeats: int = 3) -> float:
  """The best float32 FLOP/s of a square matmul (8 chained per call, so dispatch is amortised)."""
  best = 0.0
  for n in sizes:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)) / np.sqrt(n), jnp.float32)

    @jax.jit
    def chain(x):
      for _ in range(8):
        x = x @ x
      return x

    jax.block_until_ready(chain(x))
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(chain(x))
      best = max(best, 8 * 2 * n ** 3 / (time.perf_counter() - start))
  return best


def model_config(name: str, attention_backend: str = 'auto', capacity_factor: float = 1.25) -> C.Config:
  layers, d, heads, t, b = MODELS[name]
  ffn = dict(ffn='mlp')
  if name in MOE_MODELS:
    ffn_dim, moe = MOE_MODELS[name]
    ffn = dict(ffn='moe', ffn_dim=ffn_dim, moe=C.MoeConfig(capacity_factor=capacity_factor, **moe))
  return C.Config(
      model=C.ModelConfig(vocab_size=128, num_layers=layers, d_model=d, num_heads=heads,
                          pos='learned', max_len=t, tie_embeddings=True,
                          attention_backend=attention_backend, **ffn),
      data=DataConfig(), train=C.TrainConfig(steps=10_000, batch_size=b, seq_len=t, warmup_steps=10),
      mesh=C.MeshConfig(shape=(1, 1, 1)))


def resolved_backend(cfg: C.Config) -> str:
  """The attention backend the model's causal self-attention runs with (``auto`` resolved)."""
  m = cfg.model
  call = attention.Call(platform=jax.default_backend(), dtype=m.dtype, batch=cfg.train.batch_size,
                        heads=m.num_heads, head_dim=m.head_dim, q_len=cfg.train.seq_len,
                        kv_len=cfg.train.seq_len, has_bias=False, mask=attention.MaskSpec())
  return attention.resolve(m.attention_backend, call)


def _model_layout(next_fun, args, kwargs, context):
  """Interceptor that calls each method directly, skipping lcr.matmul_layout's flattening."""
  del next_fun
  return context.orig_method(*args, **kwargs)


def _sum_of_inputs(q, k, v, **unused):
  """Stands in for attention: q + k + v per query head, so every projection stays in the step."""
  del unused
  groups = q.shape[2] // k.shape[2]
  return q + jnp.repeat(k, groups, axis=2) + jnp.repeat(v, groups, axis=2)


@contextlib.contextmanager
def attention_skipped():
  """Every attention backend replaced by :func:`_sum_of_inputs` while tracing."""
  from lcr.attention import select  # pylint: disable=import-outside-toplevel
  saved = dict(select.BACKENDS)
  for name, backend in saved.items():
    select.BACKENDS[name] = dataclasses.replace(backend, fn=_sum_of_inputs)
  try:
    yield
  finally:
    select.BACKENDS.update(saved)


def throughput(cfg: C.Config, steps: int, repeats: int, model_layout: bool = False,
               skip_attention: bool = False) -> tuple[float, int, dict]:
  """(tokens/s of the best of ``repeats`` runs of ``steps`` steps, parameter count, the first
  step's metrics)."""
  device = jax.devices()[0]
  if model_layout or skip_attention:   # a distinct config, so the step is traced afresh
    cfg = dataclasses.replace(cfg, seed=cfg.seed + 1 + 2 * skip_attention)
  trainer = step.make_trainer(cfg, mesh=sharding.make_mesh(cfg.mesh, devices=[device]))
  state = trainer.init_state()
  b, t = cfg.train.batch_size, cfg.train.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  batch = sharding.global_batch(dict(
      inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=np.ones((b, t), np.float32),
      positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
      segment_ids=np.ones((b, t), np.int32)), trainer.batch_sharding)
  with (nn.intercept_methods(_model_layout) if model_layout else contextlib.nullcontext(),
        attention_skipped() if skip_attention else contextlib.nullcontext()):
    state, m = trainer.train_step(state, batch)   # traced and compiled here
  first = {k: float(v) for k, v in jax.device_get(m).items()}
  for _ in range(2):
    state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)
    best = max(best, steps * b * t / (time.perf_counter() - start))
  return best, trainer.num_params, first


def main(argv):
  del argv
  device = jax.devices()[0]
  vendor = metrics.peak_flops(device.device_kind, 'float32')
  print(f'device: {device.device_kind} ({jax.device_count()} device(s))'
        + (f'; vendor float32 peak {vendor / 1e12:.0f} TFLOP/s' if vendor else ''))
  print(f'{"cfg":<9}{"layout":>7}{"attn":>10}{"layers":>7}{"d":>5}{"heads":>6}{"T":>5}{"B":>4}{"params":>11}'
        f'{"active":>11}{"cf":>6}{"tokens/s":>10}{"GFLOP/s":>9}{"peak":>7}{"of peak":>9}{"dropped":>9}'
        + ('    MFU' if vendor else ''))
  rows = []
  variants = ([(False, False, b) for b in _BACKENDS.value] + [(True, False, 'auto')] * _COMPARE.value
              + [(False, True, 'auto')] * _SKIP.value)
  for name in _CONFIGS.value:
    factors = [float(f) for f in _FACTORS.value] if name in MOE_MODELS else [None]
    for (model_layout, skip_attention, backend), cf in itertools.product(variants, factors):
      cfg = model_config(name, backend, cf if cf is not None else 1.25)
      if _BATCH.value:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=_BATCH.value))
      peak = matmul_peak()   # measured next to each run: a busy machine lowers both alike
      tps, n, first = throughput(cfg, _STEPS.value, _REPEATS.value, model_layout, skip_attention)
      flops = metrics.flops_per_token(cfg.model, n, cfg.train.seq_len) * tps
      row = dict(config=name, layout='model' if model_layout else '2d',
                 attention='skipped' if skip_attention else resolved_backend(cfg), layers=cfg.model.num_layers,
                 d_model=cfg.model.d_model, heads=cfg.model.num_heads, seq_len=cfg.train.seq_len,
                 batch=cfg.train.batch_size, params=n, active_params=moe.active_params(cfg.model, n),
                 capacity_factor=cf, dropped_fraction=first.get('moe_dropped_fraction'),
                 tokens_per_s=tps, flops_per_s=flops,
                 matmul_peak_flops_per_s=peak, fraction_of_matmul_peak=flops / peak,
                 device=device.device_kind, mfu=flops / vendor if vendor else None)
      rows.append(row)
      dropped = '' if cf is None else f'{row["dropped_fraction"]:.1%}'
      print(f'{name:<9}{row["layout"]:>7}{row["attention"]:>10}{row["layers"]:>7}{row["d_model"]:>5}'
            f'{row["heads"]:>6}{row["seq_len"]:>5}{row["batch"]:>4}{n:>11,}{row["active_params"]:>11,}'
            f'{"" if cf is None else f"{cf:g}":>6}{tps:>10,.0f}'
            f'{flops / 1e9:>9.1f}{peak / 1e9:>7.0f}{flops / peak:>9.1%}{dropped:>9}'
            + (f'{flops / vendor:>7.1%}' if vendor else ''), flush=True)
  for row in rows:
    print(json.dumps(row))


if __name__ == '__main__':
  app.run(main)
