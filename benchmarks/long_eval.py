"""Forward time and peak memory of one small LM at long lengths, per attention backend and variant.

    python benchmarks/long_eval.py --lengths=1024,2048,4096,8192,16384,32768 \
        --backends=xla,chunked --variants=causal,sliding

Each (backend, variant, length) runs in a fresh process (peak RSS is per process): it builds the
model (2 layers, d_model 128, 4 heads, ``--pos``), compiles the forward pass ahead of time, times
one call and reports ``ru_maxrss``. A measurement whose estimated memory exceeds
``--memory_budget_gb`` (or 80% of the memory available now) is not started: status ``skipped``.
Output: one JSON object per line per measurement (backend, variant, length, seconds,
peak_rss_mb, status ok | oom | skipped, reason), then a Markdown table.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LENGTHS = flags.DEFINE_list('lengths', '1024,2048,4096,8192,16384,32768,65536', 'tokens')
_BACKENDS = flags.DEFINE_list('backends', 'xla,chunked', 'attention backends')
_VARIANTS = flags.DEFINE_list('variants', 'causal,sliding', 'model.attention variants')
_POS = flags.DEFINE_string('pos', 'alibi', 'positional encoding of the model')
_WINDOW = flags.DEFINE_integer('window', 1024, 'window of sliding/longformer/sinks')
_BLOCK = flags.DEFINE_integer('block', 512, 'attention_block of bigbird/blockwise')
_CHUNK = flags.DEFINE_integer('chunk', 512, 'model.attention_chunk')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'model.dtype (bfloat16 lets auto pick cudnn on a GPU)')
_BUDGET = flags.DEFINE_float('memory_budget_gb', 12.0, 'largest estimated peak to start')
_TIMEOUT = flags.DEFINE_integer('timeout', 1800, 'seconds per measurement')
_SINGLE = flags.DEFINE_string('single', '', 'internal: measure backend:variant:length here')

MODEL = dict(vocab_size=259, num_layers=2, d_model=128, num_heads=4, ffn_dim=512)
BASE_MB = 350            # interpreter + JAX + compiled model, measured at short lengths


def model_config(backend: str, variant: str):
  from lcr.config import ModelConfig
  return ModelConfig(**MODEL, pos=_POS.value, attention_backend=backend, attention=variant,
                     window=_WINDOW.value, attention_block=_BLOCK.value,
                     attention_chunk=_CHUNK.value, dtype=_DTYPE.value)


def estimate_mb(backend: str, length: int) -> float:
  """Peak RSS guess: xla peaks at ~3.5× its [B, H, T, T] float32 logits (measured with ALiBi:
  3.2× at 8k, 3.4× at 16k — logits, bias and probabilities live at once); cpu_flash holds the
  [B, T, T] mask as bytes; chunked is linear."""
  act = length * (MODEL['d_model'] * 12 + MODEL['vocab_size'] * 2) * 4 / 2**20
  if backend == 'cpu_flash':
    return BASE_MB + act + 2 * length * length / 2**20
  if backend == 'xla':
    return BASE_MB + act + 3.5 * MODEL['num_heads'] * length * length * 4 / 2**20
  return BASE_MB + act + 4 * MODEL['num_heads'] * length * _CHUNK.value * 4 / 2**20


def available_mb() -> float:
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) / 1024
  return float('inf')


def measure(backend: str, variant: str, length: int) -> dict:
  """Runs in the child process: compile, time one forward pass, read peak RSS."""
  import jax
  import jax.numpy as jnp
  from lcr.model import TransformerLM
  model = TransformerLM(model_config(backend, variant))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, length), 0, MODEL['vocab_size'])
  forward = jax.jit(model.apply).lower(params, tokens).compile()
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  jax.block_until_ready(forward(params, tokens))
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  row = dict(seconds=round(seconds, 3), peak_rss_mb=round(peak), compiled_rss_mb=round(base),
             status='ok')
  stats = jax.devices()[0].memory_stats()   # accelerators: the device's own peak
  if stats and 'peak_bytes_in_use' in stats:
    row['device_peak_mb'] = round(stats['peak_bytes_in_use'] / 2**20)
  return row


def run_child(backend: str, variant: str, length: int) -> dict:
  row = dict(backend=backend, variant=variant, length=length, pos=_POS.value, seconds=None,
             peak_rss_mb=None)
  limit = min(_BUDGET.value * 1024, 0.8 * available_mb())
  guess = estimate_mb(backend, length)
  if guess > limit:
    return {**row, 'status': 'skipped', 'estimated_mb': round(guess),
            'reason': f'estimated {guess / 1024:.1f} GB > limit {limit / 1024:.1f} GB'}
  argv = [sys.executable, os.path.abspath(__file__), f'--single={backend}:{variant}:{length}',
          *(f'--{f.name}={f.value}' for f in (_POS, _WINDOW, _BLOCK, _CHUNK, _DTYPE))]
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       os.environ.get('PYTHONPATH', '')])}
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT.value, env=env)
  except subprocess.TimeoutExpired:
    return {**row, 'status': 'skipped', 'reason': f'timeout after {_TIMEOUT.value} s'}
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode == 0 and lines:
    return {**row, **json.loads(lines[-1])}
  out_of_memory = (proc.returncode in (-9, 137) or 'RESOURCE_EXHAUSTED' in proc.stderr
                   or 'MemoryError' in proc.stderr)
  tail = proc.stderr.strip().splitlines()[-1:] or [f'exit code {proc.returncode}']
  return {**row, 'status': 'oom' if out_of_memory else 'error', 'reason': tail[0][:200]}


def cell(row: dict) -> str:
  if row['status'] == 'ok' and 'device_peak_mb' in row:
    return f"{row['seconds']:.2f} s / {row['device_peak_mb'] / 1024:.2f} GB on device"
  if row['status'] == 'ok':
    return f"{row['seconds']:.2f} s / {row['peak_rss_mb'] / 1024:.2f} GB"
  if 'estimated_mb' in row:
    return f"{row['status']} (needs ~{row['estimated_mb'] / 1024:.0f} GB)"
  return row['status']


def table(rows: list[dict], lengths: list[int]) -> str:
  head = '| backend | attention | ' + ' | '.join(f'{n // 1024}k' for n in lengths) + ' |'
  lines = [head, '|' + '---|' * (len(lengths) + 2)]
  keys = list(dict.fromkeys((r['backend'], r['variant']) for r in rows))
  for backend, variant in keys:
    by_len = {r['length']: r for r in rows if (r['backend'], r['variant']) == (backend, variant)}
    lines.append(f'| {backend} | {variant} | '
                 + ' | '.join(cell(by_len[n]) for n in lengths) + ' |')
  return '\n'.join(lines)


def growth(rows: list[dict]) -> list[str]:
  """Per backend/variant: memory the forward pass adds to the compiled model, by length."""
  notes = []
  for key in dict.fromkeys((r['backend'], r['variant']) for r in rows):
    ok = sorted((r['length'], r['peak_rss_mb'] - r['compiled_rss_mb']) for r in rows
                if (r['backend'], r['variant']) == key and r['status'] == 'ok')
    if ok:
      notes.append(f'{key[0]}/{key[1]}: MB added by the forward pass: '
                   + ', '.join(f'{n // 1024}k {mb}' for n, mb in ok))
  return notes


def main(argv):
  del argv
  if _SINGLE.value:
    backend, variant, length = _SINGLE.value.split(':')
    print(json.dumps(measure(backend, variant, int(length))), flush=True)
    return
  lengths = [int(n) for n in _LENGTHS.value]
  rows = []
  for backend in _BACKENDS.value:
    for variant in _VARIANTS.value:
      for length in lengths:
        row = run_child(backend, variant, length)
        rows.append(row)
        print(json.dumps(row), flush=True)
  print(f'\nforward pass, {_POS.value}, {_DTYPE.value}, batch 1, 2 layers × d_model 128 × 4 '
        f'heads; chunk {_CHUNK.value}, window {_WINDOW.value}; seconds / peak memory\n')
  print(table(rows, lengths))
  for note in growth(rows):
    print(note)


if __name__ == '__main__':
  app.run(main)
