#!/usr/bin/env bash
# GPU check of the attention backends (needs an NVIDIA GPU and jax[cuda12]; about 2-3 minutes).
#
#   bash benchmarks/gpu.sh
#
# 1. Correctness: cudnn (bf16) and chunked (bf16 and f32) against a float32 dense reference at
#    highest matmul precision, with ALiBi and RoPE, causal and sliding-window masks, forward and
#    gradients; exits non-zero on a mismatch.
# 2. Throughput: forward tokens/s of a 4-layer, d_model 1024, 16-head bf16 RoPE LM per backend.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

python - <<'EOF'
import sys, time
import jax, jax.numpy as jnp, numpy as np
from lcr import attention, positional
from lcr.attention import MaskSpec
from lcr.config import ModelConfig
from lcr.model import TransformerLM

if jax.default_backend() != 'gpu':
  sys.exit(f'no GPU: jax.default_backend() is {jax.default_backend()!r}')
print(jax.devices()[0].device_kind, 'jax', jax.__version__)
H, KV, D = 8, 2, 64
failed = []

def inputs(t, pos):
  key = jax.random.split(jax.random.PRNGKey(t), 3)
  q = jax.random.normal(key[0], (1, t, H, D), jnp.float32)
  k, v = (jax.random.normal(x, (1, t, KV, D), jnp.float32) for x in key[1:])
  p = jnp.arange(t)[None]
  bias_fn = None
  if pos == 'rope':
    q, k = positional.rotate(ModelConfig(d_model=H * D, num_heads=H, num_kv_heads=KV), q, k, p, p)
  else:
    bias_fn = positional.alibi_bias(H)
  return q, k, v, p, bias_fn

def run(backend, dtype, q, k, v, p, bias_fn, mask):
  def loss(q, k, v):
    out = attention.attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), q_pos=p, k_pos=p,
                           bias_fn=bias_fn, mask=mask, backend=backend, chunk=512)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(q)), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]

print('\n== correctness: max |error| vs float32 dense reference (out, dq, dk, dv) ==')
for t in (1024, 4096):
  for pos in ('alibi', 'rope'):
    for mask in (MaskSpec(), MaskSpec('sliding', window=256)):
      q, k, v, p, bias_fn = inputs(t, pos)
      with jax.default_matmul_precision('highest'):
        ref = run('xla', jnp.float32, q, k, v, p, bias_fn, mask)
        checks = [('chunked', jnp.float32, 2e-4), ('chunked', jnp.bfloat16, 6e-2),
                  ('cudnn', jnp.bfloat16, 6e-2)]
        for backend, dtype, tol in checks:
          got = run(backend, dtype, q, k, v, p, bias_fn, mask)
          errs = [float(np.max(np.abs(g - r)) / max(1.0, float(np.max(np.abs(r)))))
                  for g, r in zip(got, ref)]
          ok = max(errs) < tol
          failed += [] if ok else [(t, pos, mask.kind, backend)]
          print(f'{t:6d} {pos:5s} {mask.kind:7s} {backend:7s} {jnp.dtype(dtype).name:8s} '
                + ' '.join(f'{e:.1e}' for e in errs) + ('' if ok else f'  FAIL (tol {tol})'))

print('\n== throughput: forward tokens/s, 4 layers, d_model 1024, 16 heads, bf16, RoPE ==')
for t in (4096, 16384, 65536):
  for backend in ('auto', 'cudnn', 'chunked', 'xla'):
    cfg = ModelConfig(vocab_size=32000, num_layers=4, d_model=1024, num_heads=16, pos='rope',
                      dtype='bfloat16', attention_backend=backend)
    if backend == 'xla' and t > 16384:
      print(f'{t:6d} {backend:8s} skipped (dense logits do not fit)'); continue
    call = attention.Call('gpu', 'bfloat16', 1, 16, 64, t, t, False, MaskSpec())
    if backend == 'cudnn' and attention.choose(call)[0] != 'cudnn':
      print(f'{t:6d} {backend:8s} skipped ({attention.choose(call)[1]})'); continue
    model = TransformerLM(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    tokens = jnp.zeros((1, t), jnp.int32)
    fwd = jax.jit(model.apply)
    jax.block_until_ready(fwd(params, tokens))
    times = []
    for _ in range(3):
      start = time.perf_counter(); jax.block_until_ready(fwd(params, tokens))
      times.append(time.perf_counter() - start)
    note = f' (auto → {attention.choose(call)[0]})' if backend == 'auto' else ''
    print(f'{t:6d} {backend:8s} {t / np.median(times):12,.0f} tokens/s{note}')

if failed:
  sys.exit(f'mismatches: {failed}')
print('\nall correctness checks passed')
EOF
