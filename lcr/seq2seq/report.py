"""The study's figure and tables, drawn from results.jsonl files alone (never from models).

* ``length_generalization.png``: exact match against test length (log₂), one panel per (task,
  arch), one line per variant (tips and encodings; other decoding strategies dashed), a dotted
  line at the training length N; with several seeds the mean and a min–max band.
* ``summary.md``: exact match, token accuracy and BLEU per variant × test length (mean ± std over
  seeds), and BLEU before and after RL fine-tuning with sacrebleu's signature.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps, ticker
from matplotlib.figure import Figure

from lcr import results
from lcr.results import Row

RESULTS_FILE = results.RESULTS
KEY_FIELDS = ('variant', 'seed', 'task', 'train_len', 'decode', 'test_len')
METRICS = (('exact_match', 'Exact match', 3), ('token_accuracy', 'Token accuracy', 3),
           ('bleu', 'BLEU', 1))


def latest(rows: Sequence[Row]) -> list[Row]:
  return list({results.row_key(r, KEY_FIELDS): r for r in rows}.values())


def label(row: Row) -> str:
  return row['variant'] if row['decode'] == 'greedy' else f"{row['variant']} ({row['decode']})"


def series(rows: Sequence[Row], metric: str) -> dict[tuple, dict[str, dict[int, list[float]]]]:
  """{(task, arch, train_len): {label: {test_len: [value per seed]}}}, in the rows' order."""
  out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
  for r in latest(rows):
    out[(r['task'], r['arch'], r['train_len'])][label(r)][r['test_len']].append(float(r[metric]))
  return out


def _cell(values: Sequence[float], digits: int) -> str:
  if not values:
    return ''
  mean, spread = results.mean_spread(values)
  return f'{mean:.{digits}f}' + (f' ± {spread:.{digits}f}' if len(values) > 1 else '')


def _table(by_label: dict, train_len: int, digits: int) -> list[str]:
  lengths = sorted({n for v in by_label.values() for n in v})
  head = [f'{n} ({n // train_len}N)' if n % train_len == 0 else str(n) for n in lengths]
  lines = ['| variant | ' + ' | '.join(head) + ' |', '|---|' + '---:|' * len(lengths)]
  for name, values in by_label.items():
    lines.append(f'| {name} | ' + ' | '.join(_cell(values.get(n, []), digits) for n in lengths) + ' |')
  return lines


def rl_markdown(rows: Sequence[Row]) -> list[str]:
  """Greedy BLEU (and exact match) of each RL variant against the model it was fine-tuned from."""
  rows = [r for r in latest(rows) if r['decode'] == 'greedy']
  by = {(r['variant'], r['seed'], r['test_len']): r for r in rows}
  out = []
  for rl_name in sorted({r['variant'] for r in rows if r.get('rl_steps')}):
    first = next(r for r in rows if r['variant'] == rl_name)
    init = first.get('rl_init')
    lines = [f'### BLEU before and after RL: {init} → {rl_name} ({first["rl_steps"]} steps of '
             'self-critical REINFORCE, greedy decoding)', '',
             '| test length | BLEU before | BLEU after | exact match before | exact match after |',
             '|---:|---:|---:|---:|---:|']
    for n in sorted({r['test_len'] for r in rows if r['variant'] == rl_name}):
      pairs = [(by.get((init, r['seed'], n)), r) for r in rows
               if r['variant'] == rl_name and r['test_len'] == n]
      pairs = [(a, b) for a, b in pairs if a is not None]
      if not pairs:
        continue
      cells = [_cell([p[i][m] for p in pairs], d) for m, d in (('bleu', 1), ('exact_match', 3))
               for i in (0, 1)]
      lines.append(f'| {n} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |')
    out += lines + ['']
  return out


def summary_markdown(rows: Sequence[Row]) -> str:
  out = ['# Length generalisation: train on lengths ≤ N, test at N … 8N', '']
  seeds = {r['seed'] for r in rows}
  note = f' (mean ± std over {len(seeds)} seeds)' if len(seeds) > 1 else ''
  for metric, title, digits in METRICS:
    for (task, arch, train_len), by_label in series(rows, metric).items():
      out += [f'## {title}: {task}, {arch}, N = {train_len}{note}', '']
      out += _table(by_label, train_len, digits) + ['']
  out += rl_markdown(rows)
  signatures = {r.get('bleu_signature') for r in rows} - {None}
  if signatures:
    out += ['BLEU: sacrebleu ' + ', '.join(sorted(signatures)) + ' (corpus BLEU over symbols).', '']
  return '\n'.join(out)


def _color(i: int, lines: int):
  """Matplotlib's 10-colour cycle, or tab20 when a panel has more lines (no two share a colour)."""
  return f'C{i}' if lines <= 10 else colormaps['tab20'](i % 20)


def figure(rows: Sequence[Row]) -> Figure:
  groups = series(rows, 'exact_match')
  keys = list(groups)
  fig = Figure(figsize=(7.2 * max(1, len(keys)), 4.6), layout='constrained')
  for k, key in enumerate(keys):
    task, arch, train_len = key
    ax = fig.add_subplot(1, len(keys), k + 1)
    for i, (name, by_len) in enumerate(groups[key].items()):
      xs = sorted(by_len)
      style = dict(color=_color(i, len(groups[key])), marker='os^vDPX*h<>'[i % 11], markersize=4,
                   linestyle='--' if name.endswith(')') else '-')
      ax.plot(xs, [np.mean(by_len[n]) for n in xs], label=name, **style)
      if any(len(by_len[n]) > 1 for n in xs):
        ax.fill_between(xs, [min(by_len[n]) for n in xs], [max(by_len[n]) for n in xs],
                        color=style['color'], alpha=0.15, linewidth=0)
    ax.axvline(train_len, color='0.4', linewidth=1, linestyle=':', label=f'N = {train_len}')
    lengths = sorted({n for v in groups[key].values() for n in v})
    ax.set_xscale('log', base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel('test length')
    ax.set_ylabel('exact match')
    ax.set_title(f'{task}, {arch.replace("_", "-")}, trained on lengths ≤ {train_len}')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  return fig


def draw_all(workdirs: Sequence[str], out_dir: str) -> dict[str, str]:
  """length_generalization.png and summary.md from the results of one or more study workdirs."""
  rows = results.read_many(os.path.join(w, RESULTS_FILE) for w in workdirs)
  if not rows:
    return {}
  os.makedirs(out_dir, exist_ok=True)
  written = {'length_generalization.png': os.path.join(out_dir, 'length_generalization.png'),
             'summary.md': os.path.join(out_dir, 'summary.md')}
  figure(rows).savefig(written['length_generalization.png'], dpi=120)
  with open(written['summary.md'], 'w') as f:
    f.write(summary_markdown(rows))
  return written
