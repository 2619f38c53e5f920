"""Forward time and peak memory of one small LM at long lengths, per attention backend and variant,
or per token mixer and memory (lcr.mixers) and the form that computes it.

    python benchmarks/long_eval.py --lengths=1024,2048,4096,8192,16384,32768 \
        --backends=xla,chunked --variants=causal,sliding
    python benchmarks/long_eval.py --mixers=attention,linear,retention,ssm,xl,infini \
        --forms=parallel,chunkwise,recurrent --lengths=1024,4096,16384 --train_len=1024

Mixers: ``parallel`` is one forward over the whole input (linear attention and retention in their
parallel form, T×T per head; the memories segment by segment inside the call), ``chunkwise`` the
same forward with model.mixer_chunk = --train_len (linear attention, retention), ``recurrent``
feeds the input as a stream of --train_len-token calls that carry the state (lcr.mixers.stream):
memory should stay flat however long the stream. Memories use segments and memory of --train_len.

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
_SINGLE_MIXER = flags.DEFINE_string('single_mixer', '', 'internal: measure mixer:form:length here')
_MIXERS = flags.DEFINE_list('mixers', [], 'token mixers/memories to measure instead of backends: '
                            'attention, linear, retention, ssm, xl, infini')
_FORMS = flags.DEFINE_list('forms', ['parallel', 'chunkwise', 'recurrent'], 'mixer forms')
_TRAIN_LEN = flags.DEFINE_integer('train_len', 1024, 'mixers: chunk, segment and memory length')

MODEL = dict(vocab_size=259, num_layers=2, d_model=128, num_heads=4, ffn_dim=512)
BASE_MB = 350            # interpreter + JAX + compiled model, measured at short lengths


def model_config(backend: str, variant: str):
  from lcr.config import ModelConfig
  return ModelConfig(**MODEL, pos=_POS.value, attention_backend=backend, attention=variant,
                     window=_WINDOW.value, attention_block=_BLOCK.value,
                     attention_chunk=_CHUNK.value, dtype=_DTYPE.value)


MIXER_MODELS = {   # model fields per --mixers name; memories take segments of --train_len
    'attention': dict(pos='rope'), 'linear': dict(mixer='linear', pos='none'),
    'retention': dict(mixer='retention', pos='none'), 'ssm': dict(mixer='ssm', pos='none'),
    'xl': dict(memory='xl', pos='rope'), 'infini': dict(memory='infini', pos='rope'),
}


def mixer_config(mixer: str, form: str):
  from lcr.config import ModelConfig
  n = _TRAIN_LEN.value
  extra = dict(MIXER_MODELS[mixer])
  if 'memory' in extra:
    extra.update(segment_length=n, memory_length=n if mixer == 'xl' else 0)
  if form == 'chunkwise':
    extra.update(mixer_chunk=n)
  return ModelConfig(**MODEL, **extra, dtype=_DTYPE.value)


def mixer_applies(mixer: str, form: str) -> str | None:
  """Why (mixer, form) is not measured, or None."""
  if form == 'chunkwise' and mixer not in ('linear', 'retention'):
    return 'has no chunkwise form'
  if form == 'recurrent' and mixer == 'attention':
    return 'a KV cache grows with the stream'
  return None


def estimate_mixer_mb(mixer: str, form: str, length: int) -> float:
  """Peak RSS guess: the parallel forms hold [H, T, T] scores (retention also its decays), the
  associative scan [T, 2·d, N] pairs; chunked and recurrent forms one chunk's worth."""
  span = _TRAIN_LEN.value if form != 'parallel' or mixer in ('xl', 'infini') else length
  act = length * (MODEL['d_model'] * 12 + MODEL['vocab_size'] * 2) * 4 / 2**20
  if form == 'recurrent':
    act = act * _TRAIN_LEN.value / length
  quadratic = {'attention': 0.0, 'linear': 3.0, 'retention': 5.0}.get(mixer, 2.0)
  scan = 8 * length * 2 * MODEL['d_model'] * 16 * 4 / 2**20 if mixer == 'ssm' else 0.0
  per_head = quadratic * MODEL['num_heads'] * span * span * 4 / 2**20
  return BASE_MB + act + (per_head if mixer != 'attention' else estimate_mb('chunked', length))\
      + (scan if form != 'recurrent' else scan * _TRAIN_LEN.value / length)


def measure_mixer(mixer: str, form: str, length: int) -> dict:
  """Runs in the child process: compile, time one forward (or one pass over the stream)."""
  import jax
  import jax.numpy as jnp
  from lcr.mixers import stream
  from lcr.model import TransformerLM
  cfg = mixer_config(mixer, form)
  model = TransformerLM(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))['params']
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, length + 1), 0, MODEL['vocab_size'])
  if form == 'recurrent':
    jitted = stream.chunk_fn(cfg)
    stream.score(params, cfg, tokens[0, :_TRAIN_LEN.value + 1], _TRAIN_LEN.value, jitted)  # compile
    run = lambda: stream.score(params, cfg, tokens[0], _TRAIN_LEN.value, jitted)
  else:
    forward = jax.jit(model.apply).lower({'params': params}, tokens[:, :-1]).compile()
    run = lambda: jax.block_until_ready(forward({'params': params}, tokens[:, :-1]))
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  run()
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(seconds=round(seconds, 3), peak_rss_mb=round(peak), compiled_rss_mb=round(base),
              status='ok')


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


def run_child(backend: str, variant: str, length: int, mixer: bool = False) -> dict:
  """One measurement in a fresh process: (backend, variant), or (mixer, form) with ``mixer``."""
  row = dict(backend=backend, variant=variant, length=length, pos=_POS.value, seconds=None,
             peak_rss_mb=None)
  if mixer:
    row = dict(mixer=backend, form=variant, length=length, train_len=_TRAIN_LEN.value,
               seconds=None, peak_rss_mb=None)
    why_not = mixer_applies(backend, variant)
    if why_not:
      return {**row, 'status': 'n/a', 'reason': why_not}
  limit = min(_BUDGET.value * 1024, 0.8 * available_mb())
  guess = estimate_mixer_mb(backend, variant, length) if mixer else estimate_mb(backend, length)
  if guess > limit:
    return {**row, 'status': 'skipped', 'estimated_mb': round(guess),
            'reason': f'estimated {guess / 1024:.1f} GB > limit {limit / 1024:.1f} GB'}
  single = f'--single_mixer={backend}:{variant}:{length}' if mixer else (
      f'--single={backend}:{variant}:{length}')
  argv = [sys.executable, os.path.abspath(__file__), single,
          *(f'--{f.name}={f.value}' for f in (_POS, _WINDOW, _BLOCK, _CHUNK, _TRAIN_LEN, _DTYPE))]
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
  if row['status'] == 'n/a':
    return '—'
  if row['status'] == 'ok' and 'device_peak_mb' in row:
    return f"{row['seconds']:.2f} s / {row['device_peak_mb'] / 1024:.2f} GB on device"
  if row['status'] == 'ok':
    return f"{row['seconds']:.2f} s / {row['peak_rss_mb'] / 1024:.2f} GB"
  if 'estimated_mb' in row:
    return f"{row['status']} (needs ~{row['estimated_mb'] / 1024:.0f} GB)"
  return row['status']


def _key(row: dict) -> tuple[str, str]:
  return (row['mixer'], row['form']) if 'mixer' in row else (row['backend'], row['variant'])


def length_label(n: int) -> str:
  return f'{n // 1024}k' if n % 1024 == 0 else str(n)


def table(rows: list[dict], lengths: list[int]) -> str:
  names = ('mixer', 'form') if rows and 'mixer' in rows[0] else ('backend', 'attention')
  head = f'| {names[0]} | {names[1]} | ' + ' | '.join(map(length_label, lengths)) + ' |'
  lines = [head, '|' + '---|' * (len(lengths) + 2)]
  for key in dict.fromkeys(map(_key, rows)):
    by_len = {r['length']: r for r in rows if _key(r) == key}
    lines.append(f'| {key[0]} | {key[1]} | ' + ' | '.join(cell(by_len[n]) for n in lengths) + ' |')
  return '\n'.join(lines)


def growth(rows: list[dict]) -> list[str]:
  """Per backend/variant (mixer/form): memory the forward pass adds to the compiled model."""
  notes = []
  for key in dict.fromkeys(map(_key, rows)):
    ok = sorted((r['length'], r['peak_rss_mb'] - r['compiled_rss_mb']) for r in rows
                if _key(r) == key and r['status'] == 'ok')
    if ok:
      notes.append(f'{key[0]}/{key[1]}: MB added by the forward pass: '
                   + ', '.join(f'{length_label(n)} {mb}' for n, mb in ok))
  return notes


def main(argv):
  del argv
  if _SINGLE.value:
    backend, variant, length = _SINGLE.value.split(':')
    print(json.dumps(measure(backend, variant, int(length))), flush=True)
    return
  if _SINGLE_MIXER.value:
    mixer, form, length = _SINGLE_MIXER.value.split(':')
    print(json.dumps(measure_mixer(mixer, form, int(length))), flush=True)
    return
  lengths = [int(n) for n in _LENGTHS.value]
  pairs = ([(m, f, True) for m in _MIXERS.value for f in _FORMS.value] if _MIXERS.value else
           [(b, v, False) for b in _BACKENDS.value for v in _VARIANTS.value])
  rows = []
  for first, second, mixer in pairs:
    for length in lengths:
      row = run_child(first, second, length, mixer)
      rows.append(row)
      print(json.dumps(row), flush=True)
  if _MIXERS.value:
    print(f'\nmixers, {_DTYPE.value}, batch 1, 2 layers × d_model 128 × 4 heads; chunks, '
          f'segments and memory of {_TRAIN_LEN.value} tokens; seconds / peak memory\n')
  else:
    print(f'\nforward pass, {_POS.value}, {_DTYPE.value}, batch 1, 2 layers × d_model 128 × 4 '
          f'heads; chunk {_CHUNK.value}, window {_WINDOW.value}; seconds / peak memory\n')
  print(table(rows, lengths))
  for note in growth(rows):
    print(note)


if __name__ == '__main__':
  app.run(main)
