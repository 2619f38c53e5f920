"""Streaming past the training length with a KV cache: full cache, sliding window, attention sinks.

    python experiments/streaming.py --workdir=runs/quick/models/rope --length=2048

Teacher-forces the first ``--length`` tokens of the held-out split through cached decoding, one
token per step, for each cache: the full cache (every position kept), a ring of the last
``--window`` tokens, and StreamingLLM's ``--sinks`` attention sinks plus the last
``--window`` − ``--sinks`` tokens with positions renumbered inside the cache (Xiao et al. 2023,
§3.2 and Figure 3); plus the full cache under dynamic NTK. Prints bits per byte by range of
positions, a Markdown table, then one JSON line per (cache, range).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string('workdir', 'runs/quick/models/rope', 'a trained model')
_LENGTH = flags.DEFINE_integer('length', 2048, 'tokens streamed')
_WINDOW = flags.DEFINE_integer('window', 64, 'tokens the ring and the sinks cache hold')
_SINKS = flags.DEFINE_integer('sinks', 4, 'attention sinks')
_SPLIT = flags.DEFINE_string('split', 'validation', 'held-out split')


def caches(cfg, train_len: int) -> dict:
  w, n = _WINDOW.value, _SINKS.value
  out = {'full cache': cfg,
         f'sliding window {w}': dataclasses.replace(cfg, attention='sliding', window=w),
         f'sinks {n} + window {w - n}': dataclasses.replace(cfg, attention='sinks', window=w - n,
                                                             sink_tokens=n)}
  if cfg.pos == 'rope':
    out['full cache, dynamic NTK'] = dataclasses.replace(
        cfg, rope_scaling='dynamic_ntk', rope_factor=_LENGTH.value / train_len,
        rope_original_length=train_len)
  return out


def main(argv):
  del argv
  import numpy as np
  from lcr import checkpoint
  from lcr.config import DecodeConfig
  from lcr.data import pipeline
  from lcr.data.tokenizers import get_tokenizer
  from lcr.decode import engine
  params, saved = checkpoint.load_params(_WORKDIR.value)
  tokens = np.asarray(pipeline.load_eval_tokens(saved.data, _SPLIT.value).tokens[:_LENGTH.value + 1],
                      np.int32)
  byte_lengths = get_tokenizer(saved.data).byte_lengths()
  targets = tokens[1:]
  edges = [0, saved.train.seq_len] + [e for e in (256, 1024, 4096, 16384) if e < len(targets)]
  edges.append(len(targets))
  rows = []
  for name, cfg in caches(saved.model, saved.train.seq_len).items():
    logits = engine.cached_logits(params, cfg, DecodeConfig(), tokens[None, :-1], np.asarray([1]))
    log_p = logits[0] - np.logaddexp.reduce(logits[0], axis=-1, keepdims=True)
    nll = -log_p[np.arange(len(targets)), targets]
    for lo, hi in zip(edges[:-1], edges[1:]):
      bpb = nll[lo:hi].sum() / math.log(2) / max(byte_lengths[targets[lo:hi]].sum(), 1)
      rows.append(dict(cache=name, positions=f'{lo}-{hi - 1}', bpb=float(bpb)))
  ranges = [f'{lo}-{hi - 1}' for lo, hi in zip(edges[:-1], edges[1:])]
  print(f'{_WORKDIR.value}: trained at L = {saved.train.seq_len}, {len(targets)} tokens streamed; '
        'bits per byte by position')
  print('| cache | ' + ' | '.join(ranges) + ' |')
  print('|---|' + '---:|' * len(ranges))
  for name in dict.fromkeys(r['cache'] for r in rows):
    cells = {r['positions']: r['bpb'] for r in rows if r['cache'] == name}
    print(f'| {name} | ' + ' | '.join(f'{cells[r]:.3f}' for r in ranges) + ' |')
  for row in rows:
    print(json.dumps(row))


if __name__ == '__main__':
  app.run(main)
