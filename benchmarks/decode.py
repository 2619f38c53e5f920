"""Decoding speed and KV-cache memory against context length, and the same for Hugging Face GPT-2.

    python benchmarks/decode.py --lengths=1024,8192,32768 --caches=full,sliding,sinks \
        --heads=mha,gqa,mqa [--peer]

The model is the quickstart's size (2 layers, d_model 128, 4 heads, bytes, RoPE), randomly
initialised (speed does not depend on the weights), batch 1, float32 on CPU. For every cache
(``full``: causal attention, every position kept; ``sliding``: a ring of ``--window`` keys;
``sinks``: StreamingLLM's 4 sinks + a ring of ``--window`` − 4, renumbered in the cache) and every
head layout (MHA 4 K/V heads, GQA 2, MQA 1) at every context length N it measures:

  * prefill: seconds to run the N-token prompt (``full``, ``sliding``) and fill the cache;
  * per-token latency of cached greedy steps at context N (the best of 3 timed loops of
    ``--new_tokens`` steps, compiled once, after a warm-up) and its inverse, tokens/s;
  * cache MB: the bytes of every layer's key, value and position arrays.

``sinks`` is prefilled with its first 4 + window tokens and then stepped at positions from N on:
its cost and memory do not depend on how the window was filled.

``--peer`` times Hugging Face ``transformers`` GPT-2 of the same size (2 layers, n_embd 128,
4 heads, vocabulary 259, random weights) generating with its KV cache: prefill seconds, and
per-token latency from generate(G + 1) − generate(1) over G tokens. It needs torch and
transformers (not in requirements.txt): run it with an interpreter that has them, e.g.
``--peer_python=/path/to/venv/bin/python``.

Output: a Markdown table, then one JSON object per line.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LENGTHS = flags.DEFINE_list('lengths', '1024,8192,32768', 'context lengths N')
_CACHES = flags.DEFINE_list('caches', 'full,sliding,sinks', 'full | sliding | sinks')
_HEADS = flags.DEFINE_list('heads', 'mha,gqa,mqa', 'mha (4 K/V heads) | gqa (2) | mqa (1)')
_WINDOW = flags.DEFINE_integer('window', 1024, 'sliding window; sinks: 4 sinks + window − 4')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'cached steps per timed loop')
_PEER = flags.DEFINE_bool('peer', False, 'also time Hugging Face GPT-2 generate')
_PEER_PYTHON = flags.DEFINE_string('peer_python', sys.executable, 'interpreter with torch + transformers')
_PEER_SINGLE = flags.DEFINE_integer('peer_single', 0, 'internal: time GPT-2 at this length here')

# `auto`: the prefill takes cpu_flash or chunked by length, the steps (one query) take xla.
MODEL = dict(vocab_size=259, num_layers=2, d_model=128, num_heads=4, ffn_dim=512, pos='rope',
             attention_backend='auto')
KV_HEADS = {'mha': 4, 'gqa': 2, 'mqa': 1}
SINKS = 4


def model_config(cache: str, heads: str):
  from lcr.config import ModelConfig
  pattern = {'full': {}, 'sliding': dict(attention='sliding', window=_WINDOW.value),
             'sinks': dict(attention='sinks', window=_WINDOW.value - SINKS, sink_tokens=SINKS)}
  return ModelConfig(**MODEL, num_kv_heads=KV_HEADS[heads], **pattern[cache])


def measure(cache: str, heads: str, length: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lcr.config import DecodeConfig
  from lcr.decode import engine, sampling
  from lcr.model import TransformerLM

  cfg = model_config(cache, heads)
  params = jax.jit(TransformerLM(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  g = _NEW.value
  stepper = engine.Stepper(cfg, DecodeConfig(max_new_tokens=g + 1), length)
  prompt_len = stepper.prefill_len
  prompt = jnp.asarray(np.random.default_rng(0).integers(3, 259, size=(1, length)), jnp.int32)
  lengths = jnp.asarray([prompt_len], jnp.int32)
  prefill = jax.jit(stepper.prefill)
  start = time.perf_counter()
  logits, state = jax.block_until_ready(prefill(params, prompt, lengths))
  prefill_s = time.perf_counter() - start   # includes compilation
  start = time.perf_counter()
  logits, state = jax.block_until_ready(prefill(params, prompt, lengths))
  prefill_s = min(prefill_s, time.perf_counter() - start)

  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))

  @functools.partial(jax.jit, donate_argnums=1)   # the cache is updated in place, as in generate
  def steps(params, state, token):
    def body(i, carry):
      state, token = carry
      logits, state = stepper.step(params, state, token, jnp.full((1,), length + i, jnp.int32))
      return state, sampling.greedy(logits)
    return jax.lax.fori_loop(0, g, body, (state, token))

  carry = jax.block_until_ready(steps(params, state, sampling.greedy(logits)))   # compiles
  loop_s = float('inf')
  for _ in range(3):     # each loop steps at positions N … N + G − 1 again, from the last state
    start = time.perf_counter()
    carry = jax.block_until_ready(steps(params, *carry))
    loop_s = min(loop_s, time.perf_counter() - start)
  return dict(impl='lcr', cache=cache, heads=heads, kv_heads=KV_HEADS[heads], context=length,
              prefill_tokens=prompt_len, prefill_s=round(prefill_s, 4),
              ms_per_token=round(1e3 * loop_s / g, 4), tokens_per_s=round(g / loop_s, 1),
              cache_mb=round(cache_bytes / 2**20, 3), cache_slots=stepper.layout.capacity)


def peer(length: int) -> dict:
  """Hugging Face GPT-2 of the same size, greedy generate with its cache (torch, 2 threads)."""
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count() or 1)
  g = _NEW.value
  cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=259,
                                n_positions=length + g + 8, n_inner=512)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  ids = torch.randint(3, 259, (1, length))
  kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

  def gen(n):
    with torch.inference_mode():
      return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

  gen(2)
  times = {}
  for n in (1, g + 1):
    best = float('inf')
    for _ in range(3):
      start = time.perf_counter()
      gen(n)
      best = min(best, time.perf_counter() - start)
    times[n] = best
  per_token = (times[g + 1] - times[1]) / g
  cache_bytes = 2 * cfg.n_layer * (length + g) * cfg.n_embd * 4
  return dict(impl=f'transformers {transformers.__version__} GPT-2 (torch {torch.__version__})',
              cache='full', heads='mha', kv_heads=4, context=length, prefill_tokens=length,
              prefill_s=round(times[1], 4), ms_per_token=round(1e3 * per_token, 4),
              tokens_per_s=round(1 / per_token, 1), cache_mb=round(cache_bytes / 2**20, 3),
              cache_slots=length + g)


def run_peer(length: int) -> dict:
  proc = subprocess.run([_PEER_PYTHON.value, os.path.abspath(__file__), f'--peer_single={length}',
                         f'--new_tokens={_NEW.value}'], capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return dict(impl='transformers GPT-2', context=length, status='failed', reason=tail)
  return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
  out = ['| impl | cache | heads | context | prefill s | ms/token | tokens/s | cache MB |',
         '|---|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    if r.get('status') == 'failed':
      out.append(f"| {r['impl']} | failed: {r['reason']} | | {r['context']} | | | | |")
      continue
    out.append(f"| {r['impl'].split(' (')[0]} | {r['cache']} | {r['heads']} | {r['context']} | "
               f"{r['prefill_s']:.3f} | {r['ms_per_token']:.3f} | {r['tokens_per_s']:,.0f} | "
               f"{r['cache_mb']:.2f} |")
  return '\n'.join(out)


def main(argv):
  del argv
  if _PEER_SINGLE.value:
    print(json.dumps(peer(_PEER_SINGLE.value)))
    return
  rows = []
  for length in map(int, _LENGTHS.value):
    for cache in _CACHES.value:
      for heads in _HEADS.value:
        rows.append(measure(cache, heads, length))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if _PEER.value:
      rows.append(run_peer(length))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  print(table(rows))
  for row in rows:
    print(json.dumps(row))


if __name__ == '__main__':
  app.run(main)
