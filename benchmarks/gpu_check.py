"""The checks behind benchmarks/gpu.sh, one per subcommand (each prints a table and JSON lines).

    python benchmarks/gpu_check.py correctness      # cudnn and chunked vs a float32 reference
    python benchmarks/gpu_check.py forward          # forward tokens/s of a 4-layer LM per backend
    python benchmarks/gpu_check.py train --model=gpt2 --seq_len=2048 --batch=32 --steps=50
    python benchmarks/gpu_check.py train --model=gpu_preset --steps=50
    python benchmarks/gpu_check.py <any> --cpu_dry_run  # tiny sizes on the CPU: checks the script

``train`` times lcr's own jitted train step (``lcr.step.make_trainer``: AdamW, clipping, donation)
on random tokens and reports tokens/s and MFU, with FLOPs per token counted as 6·N + 6·L·T·D
(``lcr.metrics.flops_per_token``), against the vendor's dense bf16 peak (989 TFLOP/s for
H100/H200 SXM) and against the best bf16 matmul rate measured here. Nothing here reads a corpus,
so neither the data pipeline's packages (grain, tensorflow-datasets) nor a network are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcr import attention, metrics, positional, sharding, step  # noqa: E402
from lcr import config as C  # noqa: E402
from lcr.attention import MaskSpec  # noqa: E402

# (layers, d_model, heads, vocab, seq_len, batch): GPT-2 small (~125M with a 32k vocabulary), and
# the model of configs/lm.py:gpu (its BPE vocabulary of 8192).
MODELS = {'gpt2': (12, 768, 12, 32768, 2048, 32), 'gpu_preset': (6, 384, 6, 8192, 512, 64)}
DRY_MODELS = {'gpt2': (2, 64, 4, 256, 128, 2), 'gpu_preset': (2, 64, 4, 256, 64, 2)}


def emit(row: dict) -> None:
  print(json.dumps(row), flush=True)


def check_platform(dry_run: bool) -> None:
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}',
        flush=True)
  if not dry_run and jax.default_backend() != 'gpu':
    sys.exit(f'no GPU: jax.default_backend() is {jax.default_backend()!r} (use --cpu_dry_run)')


# ----------------------------------------------------------------------------------------------
# Correctness of the attention backends.


def _inputs(t: int, pos: str, heads=8, kv_heads=2, head_dim=64):
  keys = jax.random.split(jax.random.PRNGKey(t), 3)
  q = jax.random.normal(keys[0], (1, t, heads, head_dim), jnp.float32)
  k, v = (jax.random.normal(x, (1, t, kv_heads, head_dim), jnp.float32) for x in keys[1:])
  p = jnp.arange(t)[None]
  bias_fn = None
  if pos == 'rope':
    cfg = C.ModelConfig(d_model=heads * head_dim, num_heads=heads, num_kv_heads=kv_heads)
    q, k = positional.rotate(cfg, q, k, p, p)
  else:
    bias_fn = positional.alibi_bias(heads)
  return q, k, v, p, bias_fn


def _out_and_grads(backend, dtype, q, k, v, p, bias_fn, mask):
  def loss(q, k, v):
    out = attention.attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), q_pos=p, k_pos=p,
                           bias_fn=bias_fn, mask=mask, backend=backend, chunk=512)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(q)), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]


def correctness(args) -> int:
  """cudnn (bf16) and chunked (f32) against dense f32 attention at highest precision."""
  lengths = (64, 128) if args.cpu_dry_run else (1024, 4096)
  checks = [('chunked', jnp.float32, 2e-4)]
  checks += [] if args.cpu_dry_run else [('cudnn', jnp.bfloat16, 6e-2)]
  print('max |error| / max |reference| of (out, dq, dk, dv)')
  failed = 0
  for t in lengths:
    for pos in ('alibi', 'rope'):
      for mask in (MaskSpec(), MaskSpec('sliding', window=t // 4)):
        q, k, v, p, bias_fn = _inputs(t, pos)
        with jax.default_matmul_precision('highest'):
          ref = _out_and_grads('xla', jnp.float32, q, k, v, p, bias_fn, mask)
          for backend, dtype, tol in checks:
            got = _out_and_grads(backend, dtype, q, k, v, p, bias_fn, mask)
            errs = [float(np.max(np.abs(g - r)) / max(1.0, float(np.max(np.abs(r)))))
                    for g, r in zip(got, ref)]
            ok = max(errs) < tol
            failed += not ok
            print(f'{t:6d} {pos:5s} {mask.kind:7s} {backend:7s} {jnp.dtype(dtype).name:8s} '
                  + ' '.join(f'{e:.1e}' for e in errs) + ('' if ok else f'  FAIL (tol {tol})'),
                  flush=True)
            emit(dict(check='correctness', length=t, pos=pos, mask=mask.kind, backend=backend,
                      dtype=jnp.dtype(dtype).name, errors=errs, tolerance=tol, ok=ok))
  print('all correctness checks passed' if not failed else f'{failed} checks FAILED')
  return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# Forward throughput per backend.


def forward(args) -> int:
  """Forward tokens/s of a 4-layer, d_model 1024, 16-head bf16 RoPE LM per attention backend."""
  from lcr.model import TransformerLM  # pylint: disable=import-outside-toplevel
  lengths = (256,) if args.cpu_dry_run else (4096, 16384, 65536)
  backends = ('auto', 'chunked') if args.cpu_dry_run else ('auto', 'cudnn', 'chunked', 'xla')
  d, heads = (64, 4) if args.cpu_dry_run else (1024, 16)
  for t in lengths:
    for backend in backends:
      call = attention.Call(jax.default_backend(), 'bfloat16', 1, heads, d // heads, t, t, False,
                            MaskSpec())
      if backend == 'xla' and t > 16384:
        print(f'{t:6d} {backend:8s} skipped (dense logits do not fit)')
        continue
      if backend == 'cudnn' and attention.choose(call)[0] != 'cudnn':
        print(f'{t:6d} {backend:8s} skipped ({attention.choose(call)[1]})')
        continue
      cfg = C.ModelConfig(vocab_size=32000, num_layers=4, d_model=d, num_heads=heads, pos='rope',
                          dtype='bfloat16', attention_backend=backend)
      model = TransformerLM(cfg)
      params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
      tokens = jnp.zeros((1, t), jnp.int32)
      fwd = jax.jit(model.apply)
      jax.block_until_ready(fwd(params, tokens))
      times = []
      for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(fwd(params, tokens))
        times.append(time.perf_counter() - start)
      chosen = attention.choose(call)[0] if backend == 'auto' else backend
      tps = t / float(np.median(times))
      print(f'{t:6d} {backend:8s} {tps:12,.0f} tokens/s' + (f' (auto → {chosen})' if backend == 'auto' else ''),
            flush=True)
      emit(dict(check='forward', length=t, backend=backend, runs=chosen, tokens_per_s=tps))
  return 0


# ----------------------------------------------------------------------------------------------
# Training throughput and MFU.


def matmul_peak(dtype, n: int, repeats: int = 5) -> float:
  """Best FLOP/s of 8 chained n×n matmuls in ``dtype`` (one call, so launches are amortised)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)) / np.sqrt(n), dtype)

  @jax.jit
  def chain(x):
    for _ in range(8):
      x = x @ x
    return x

  jax.block_until_ready(chain(x))
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(chain(x))
    best = max(best, 8 * 2 * n ** 3 / (time.perf_counter() - start))
  return best


def train_config(args) -> C.Config:
  layers, d, heads, vocab, seq_len, batch = (DRY_MODELS if args.cpu_dry_run else MODELS)[args.model]
  model = C.ModelConfig(vocab_size=vocab, num_layers=layers, d_model=d, num_heads=heads,
                        pos='rope', dtype=args.dtype, attention_backend=args.attention_backend,
                        remat=args.remat, scan_layers=args.scan_layers)
  train = C.TrainConfig(steps=10_000, batch_size=args.batch or batch,
                        seq_len=args.seq_len or seq_len, lr=6e-4, warmup_steps=100)
  # data=None: the trainer never reads it, and the data room's packages need not be installed.
  return C.Config(model=model, data=None, train=train, mesh=C.MeshConfig(shape=(1, 1, 1)))


def train(args) -> int:
  cfg = train_config(args)
  device = jax.devices()[0]
  trainer = step.make_trainer(cfg, mesh=sharding.make_mesh(cfg.mesh, [device]))
  b, t = cfg.train.batch_size, cfg.train.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  batch = sharding.global_batch(dict(
      inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=np.ones((b, t), np.float32),
      positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
      segment_ids=np.ones((b, t), np.int32)), trainer.batch_sharding)
  state = trainer.init_state()
  start = time.perf_counter()
  state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - start
  for _ in range(3):
    state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, m = trainer.train_step(state, batch)
  loss = float(m['loss'])   # waits for the last step
  seconds = (time.perf_counter() - start) / args.steps
  tps = b * t / seconds
  flops = metrics.flops_per_token(cfg.model, trainer.num_params, t) * tps
  dtype = 'float32' if args.dtype == 'float32' else 'bfloat16'
  vendor = metrics.peak_flops(device.device_kind, dtype)
  measured = matmul_peak(jnp.dtype(args.dtype), 512 if args.cpu_dry_run else 8192)
  call = attention.Call(jax.default_backend(), args.dtype, b, cfg.model.num_heads,
                        cfg.model.head_dim, t, t, False, MaskSpec())
  backend = attention.resolve(cfg.model.attention_backend, call)
  stats = device.memory_stats() or {}
  row = dict(check='train', model=args.model, device=device.device_kind, params=trainer.num_params,
             layers=cfg.model.num_layers, d_model=cfg.model.d_model, heads=cfg.model.num_heads,
             seq_len=t, batch=b, dtype=args.dtype, attention=backend, remat=args.remat,
             scan_layers=args.scan_layers, steps=args.steps, step_s=seconds, tokens_per_s=tps,
             flops_per_s=flops, mfu_vendor=flops / vendor if vendor else None,
             vendor_peak=vendor, measured_matmul_peak=measured, of_measured_peak=flops / measured,
             compile_s=compile_s, loss=loss, peak_bytes=stats.get('peak_bytes_in_use'))
  print(f'{args.model}: {trainer.num_params / 1e6:.1f}M params, {cfg.model.num_layers} layers, '
        f'd {cfg.model.d_model}, T {t}, batch {b}, {args.dtype}, attention {backend}: '
        f'{seconds * 1e3:.1f} ms/step, {tps:,.0f} tokens/s, {flops / 1e12:.1f} TFLOP/s = '
        + (f'{flops / vendor:.1%} MFU of {vendor / 1e12:.0f} TFLOP/s (data sheet), ' if vendor else '')
        + f'{flops / measured:.1%} of the measured {jnp.dtype(args.dtype).name} matmul peak '
        f'{measured / 1e12:.1f} TFLOP/s; compile {compile_s:.0f} s; loss {loss:.3f}', flush=True)
  emit(row)
  return 0 if np.isfinite(loss) else 1


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('check', choices=('correctness', 'forward', 'train'))
  parser.add_argument('--cpu_dry_run', action='store_true', help='tiny sizes, on any device')
  parser.add_argument('--model', choices=sorted(MODELS), default='gpt2')
  parser.add_argument('--seq_len', type=int, default=0, help='0: the model default')
  parser.add_argument('--batch', type=int, default=0, help='0: the model default')
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--attention_backend', default='auto')
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--scan_layers', action='store_true')
  args = parser.parse_args()
  check_platform(args.cpu_dry_run)
  return {'correctness': correctness, 'forward': forward, 'train': train}[args.check](args)


if __name__ == '__main__':
  sys.exit(main())
