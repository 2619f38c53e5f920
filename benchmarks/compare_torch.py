"""lcr's train step against PyTorch eager on the same CPU: alternating runs, best of three.

    python benchmarks/compare_torch.py --torch_python=/path/to/venv-with-torch/bin/python
    python benchmarks/compare_torch.py --configs=a,b --rounds=3 --torch_python=...

For each model (a, b, c of train_throughput.py, and b at T = 2048 and 8192 with 8192 tokens per
step) it runs ``train_throughput.py`` and ``torch_reference.py`` as fresh processes, one after the
other, ``--rounds`` times (lcr first in odd rounds, PyTorch first in even ones), so both see the
same load on a shared machine; each run reports the best of its timed windows, and the table
keeps each framework's best run. Prints the table and one JSON object per model. torch is not an
lcr requirement: give the interpreter of a virtualenv that has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIGS = flags.DEFINE_list('configs', ['a', 'b', 'c', 'b2k', 'b8k'], 'models to compare')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'alternating runs per framework; the best is kept')
_STEPS = flags.DEFINE_integer('steps', 10, 'timed steps per window')
_TORCH = flags.DEFINE_string('torch_python', 'python3', 'an interpreter that can import torch')
_LCR_FLAGS = flags.DEFINE_list('lcr_flags', [], 'extra flags for train_throughput.py')


def _run(argv: list[str]) -> dict:
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=os.path.dirname(HERE))
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not rows:
    raise RuntimeError(f'{" ".join(argv)} failed:\n{proc.stderr[-2000:]}')
  return rows[0]


def _lcr(name: str) -> dict:
  return _run([sys.executable, os.path.join(HERE, 'train_throughput.py'), f'--configs={name}',
               f'--steps={_STEPS.value}', '--repeats=3', *_LCR_FLAGS.value])


def _torch(name: str) -> dict:
  return _run([_TORCH.value, os.path.join(HERE, 'torch_reference.py'), f'--configs={name}',
               f'--steps={_STEPS.value}', '--repeats=3'])


def main(argv):
  del argv
  results = []
  for name in _CONFIGS.value:
    lcr, torch = [], []
    for r in range(_ROUNDS.value):
      order = ((_lcr, lcr), (_torch, torch))
      for run, into in order if r % 2 == 0 else order[::-1]:
        into.append(run(name))
      print(f'{name} round {r + 1}: lcr {lcr[-1]["tokens_per_s"]:,.0f}, '
            f'torch {torch[-1]["tokens_per_s"]:,.0f} tokens/s', file=sys.stderr, flush=True)
    best_lcr = max(lcr, key=lambda x: x['tokens_per_s'])
    best_torch = max(torch, key=lambda x: x['tokens_per_s'])
    results.append(dict(
        config=name, layers=best_lcr['layers'], d_model=best_lcr['d_model'],
        heads=best_lcr['heads'], seq_len=best_lcr['seq_len'], batch=best_lcr['batch'],
        attention=best_lcr['attention'], lcr_tokens_per_s=best_lcr['tokens_per_s'],
        torch_tokens_per_s=best_torch['tokens_per_s'],
        ratio=best_lcr['tokens_per_s'] / best_torch['tokens_per_s'],
        lcr_runs=[x['tokens_per_s'] for x in lcr], torch_runs=[x['tokens_per_s'] for x in torch],
        lcr_gflops=best_lcr['flops_per_s'] / 1e9,
        of_matmul_peak=best_lcr['fraction_of_matmul_peak'],
        matmul_peak_gflops=best_lcr['matmul_peak_flops_per_s'] / 1e9))
  print('| model (layers, d, heads, T, batch) | lcr tokens/s | PyTorch tokens/s | lcr / PyTorch '
        '| lcr GFLOP/s | of matmul peak |')
  print('|---|---:|---:|---:|---:|---:|')
  for r in results:
    print(f'| {r["config"]} ({r["layers"]}, {r["d_model"]}, {r["heads"]}, {r["seq_len"]}, '
          f'{r["batch"]}) | {r["lcr_tokens_per_s"]:,.0f} | {r["torch_tokens_per_s"]:,.0f} | '
          f'{r["ratio"]:.2f}× | {r["lcr_gflops"]:.0f} | {r["of_matmul_peak"]:.0%} |')
  for r in results:
    print(json.dumps(r))


if __name__ == '__main__':
  app.run(main)
