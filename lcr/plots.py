"""Figures of the study, drawn from its result files alone (never from models or training).

* ``extrapolation.png``: perplexity vs evaluation length, log-x, one line per variant and RoPE
  scaling, a vertical line at the training length (the ALiBi paper's Figure 1); with several seeds
  the line is the mean and a band spans min..max.
* ``per_position.png``: loss by position in the window at the longest evaluation length.
* ``passkey.png``: passkey accuracy heatmaps, context length × needle depth, one per variant.
* ``recall.png``: recall of a retrieval task (MQAR, recall.jsonl) against context length, one panel
  per needle depth, one line per variant and RoPE scaling.
* ``extension.png``: perplexity of the fine-tuned extensions (extension.jsonl) beside the
  evaluation-time-only curve of the same scaling (results.jsonl), one panel per scaling.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from lcr import results
from lcr.results import Row

_STYLES = ('--', ':', '-.', (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
_MARKERS = ('o', 's', '^', 'v', 'D', 'P', 'X', '*', 'h', '<', '>')


def _styles(labels: Sequence[str]) -> dict[str, dict]:
  """A colour and marker per series (in the order given); RoPE scalings are dashed."""
  out = {}
  for i, label in enumerate(labels):
    scaling = label.partition(' + ')[2]
    j = results.SCALING_ORDER.index(scaling) if scaling in results.SCALING_ORDER else 0
    out[label] = dict(color=f'C{i % 10}', marker=_MARKERS[i % len(_MARKERS)], markersize=4,
                      linestyle=_STYLES[(j - 1) % len(_STYLES)] if scaling else '-')
  return out


def _legend(ax) -> None:
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _plain_log_axes(ax, xs: Sequence[int], log_y: bool) -> None:
  """Log axes labelled with plain numbers: the evaluation lengths on x, 2, 3, 5, 10, 20 ... on y."""
  ax.set_xscale('log', base=2)
  ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  if log_y:
    ax.set_yscale('log')
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def extrapolation_figure(rows: Sequence[Row], value: str = 'ppl') -> Figure:
  """One panel per protocol: ``value`` vs evaluation length, mean line and min..max band over seeds."""
  groups = results.aggregate(rows, value)
  protocols = sorted({p for p, _, _ in groups}, key=lambda p: (p != 'nonoverlapping', p))
  fig = Figure(figsize=(7.6 * max(1, len(protocols)), 4.8), layout='constrained')
  order = results.series_order(rows)
  styles = _styles(sorted({label for _, _, label in groups}, key=order))
  multi_len = len({t for _, t, _ in groups}) > 1
  for k, protocol in enumerate(protocols):
    ax = fig.add_subplot(1, len(protocols), k + 1)
    keys = sorted((key for key in groups if key[0] == protocol),
                  key=lambda key: (key[1], order(key[2])))
    for _, train_len, label in keys:
      by_len = groups[(protocol, train_len, label)]
      xs = sorted(by_len)
      ys = np.array([np.mean(by_len[n]) for n in xs])
      name = f'{label} (L={train_len})' if multi_len else label
      ax.plot(xs, ys, label=name, **styles[label])
      if any(len(by_len[n]) > 1 for n in xs):
        ax.fill_between(xs, [min(by_len[n]) for n in xs], [max(by_len[n]) for n in xs],
                        color=styles[label]['color'], alpha=0.15, linewidth=0)
    for train_len in sorted({t for p, t, _ in groups if p == protocol}):
      ax.axvline(train_len, color='0.4', linewidth=1, linestyle=':', label=f'train length {train_len}')
    _plain_log_axes(ax, [n for key in keys for n in groups[key]], log_y=True)
    ax.set_xlabel('evaluation length (tokens)')
    ax.set_ylabel('perplexity' if value == 'ppl' else value)
    stride = {r['stride'] for r in rows if r['protocol'] == protocol}
    extra = f', stride {sorted(stride)[0]}' if protocol == 'sliding' and len(stride) == 1 else ''
    lengths = ', '.join(str(t) for t in sorted({t for p, t, _ in groups if p == protocol}))
    ax.set_title(f'trained at L = {lengths}; {protocol} windows{extra}')
    ax.grid(True, which='both', alpha=0.3)
    _legend(ax)
  return fig


def _log_bins(values: np.ndarray, weights: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
  """Weighted means of ``values`` over log-spaced bins of position + 1 → (bin centre, mean)."""
  n = len(values)
  edges = np.unique(np.round(np.geomspace(1, n + 1, bins + 1)).astype(int)) - 1
  xs, ys = [], []
  for lo, hi in zip(edges[:-1], edges[1:]):
    w = weights[lo:hi]
    if w.sum() > 0:
      xs.append(np.sqrt(lo + 1) * np.sqrt(hi))
      ys.append(np.sum(values[lo:hi] * w) / w.sum())
  return np.asarray(xs), np.asarray(ys)


def per_position_figure(rows: Sequence[Row], bins: int = 80) -> Figure:
  """Loss vs position in the window (log-x), averaged over windows, lengths and seeds.

  With non-overlapping windows every evaluation length whose model is the same contributes: in a
  causal model the loss at position p depends only on the p tokens before it in its window, not on
  how far the window runs past p, so position p averages the windows of every length > p (many at
  small p, the few of the longest length at large p). A RoPE scaling whose factor grows with the
  length is a different model at each length: only rows with the longest row's ``rope_factor``
  are pooled. With sliding windows only the longest length is drawn.
  """
  fig = Figure(figsize=(8.4, 4.8), layout='constrained')
  ax = fig.add_subplot()
  latest = list({results.row_key(r): r for r in rows}.values())
  protocols = {r['protocol'] for r in latest}
  protocol = 'nonoverlapping' if 'nonoverlapping' in protocols else min(protocols, default=None)
  latest = [r for r in latest if r['protocol'] == protocol]
  longest: dict[tuple, int] = defaultdict(int)
  factor: dict[tuple, float] = {}
  for r in latest:
    key = (r['train_len'], results.series_label(r))
    if r['eval_len'] > longest[key]:
      longest[key], factor[key] = r['eval_len'], r.get('rope_factor', 1.0)
  sums = {key: [np.zeros(n), np.zeros(n)] for key, n in longest.items()}
  for r in latest:
    key = (r['train_len'], results.series_label(r))
    same_model = r.get('rope_factor', 1.0) == factor[key]
    if (protocol == 'nonoverlapping' and same_model) or r['eval_len'] == longest[key]:
      count = np.asarray(r['count'], np.float64)
      loss = np.where(count > 0, np.nan_to_num(np.asarray(r['loss'], np.float64)), 0.0)
      sums[key][0][:len(loss)] += loss * count
      sums[key][1][:len(count)] += count
  order = results.series_order(rows)
  styles = _styles(sorted({label for _, label in sums}, key=order))
  for (_, label), (total, count) in sorted(sums.items(), key=lambda kv: (kv[0][0], order(kv[0][1]))):
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    xs, ys = _log_bins(mean, count, bins)
    ax.plot(xs, ys, label=label, **{**styles[label], 'marker': None})
  for train_len in sorted({t for t, _ in sums}):
    ax.axvline(train_len, color='0.4', linewidth=1, linestyle=':', label=f'train length {train_len}')
  longest_len = max(longest.values(), default=1)
  _plain_log_axes(ax, [2 ** k for k in range(int(np.log2(longest_len)) + 1)], log_y=False)
  ax.set_xlabel('position in the window (tokens)')
  ax.set_ylabel('loss (nats/token)')
  ax.set_title(f'loss per position ({protocol} windows)')
  ax.grid(True, which='both', alpha=0.3)
  _legend(ax)
  return fig


def passkey_figure(rows: Sequence[Row]) -> Figure:
  """One heatmap per series: accuracy by context length (x) and needle depth (y), mean over seeds."""
  latest = {results.row_key(r, results.PASSKEY_KEY_FIELDS): r for r in rows}.values()
  cells: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
  for r in latest:
    cells[results.series_label(r)][(r['eval_len'], r['depth'])].append(r['accuracy'])
  labels = sorted(cells, key=results.series_order(rows))
  cols = min(4, max(1, len(labels)))
  nrows = -(-len(labels) // cols) if labels else 1
  fig = Figure(figsize=(3.4 * cols + 1, 2.8 * nrows), layout='constrained')
  axes = [fig.add_subplot(nrows, cols, i + 1) for i in range(max(1, len(labels)))]
  image = None
  for ax, label in zip(axes, labels):
    lengths = sorted({n for n, _ in cells[label]})
    depths = sorted({d for _, d in cells[label]})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (n, d), accs in cells[label].items():
      grid[depths.index(d), lengths.index(n)] = np.mean(accs)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap='viridis', origin='lower', aspect='auto')
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7, rotation=45)
    ax.set_yticks(range(len(depths)), [f'{d:g}' for d in depths], fontsize=7)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel('context length', fontsize=8)
    ax.set_ylabel('needle depth', fontsize=8)
  if image is not None:
    fig.colorbar(image, ax=axes, label='passkey accuracy')
  return fig


def draw_all(workdirs: Sequence[str], out_dir: str) -> dict[str, str]:
  """Redraws every figure and summary.md from the result files of one or more study workdirs."""
  def read(name):
    return results.read_many(os.path.join(w, name) for w in workdirs)
  os.makedirs(out_dir, exist_ok=True)
  rows, per_position, passkey = read(results.RESULTS), read(results.PER_POSITION), read(results.PASSKEY)
  recall, extension = read(results.RECALL), read(results.EXTENSION)
  written = {}
  for name, rows_, make in (('extrapolation.png', rows, extrapolation_figure),
                            ('per_position.png', per_position, per_position_figure),
                            ('passkey.png', passkey, passkey_figure),
                            ('recall.png', recall, recall_figure),
                            ('extension.png', extension, lambda e: extension_figure(e, rows))):
    if rows_:
      path = os.path.join(out_dir, name)
      make(rows_).savefig(path, dpi=120)
      written[name] = path
  if rows or passkey or recall:
    path = os.path.join(out_dir, 'summary.md')
    with open(path, 'w') as f:
      f.write(results.summary_markdown(rows, passkey, recall, extension))
    written['summary.md'] = path
  return written


# ----------------------------------------------------------------------------------------------
# The retrieval and extension phases.


def recall_figure(rows: Sequence[Row], value: str = 'answer_accuracy') -> Figure:
  """``value`` against context length, one panel per depth, mean over seeds."""
  cells = results.recall_cells(rows, value)
  depths = sorted({d for c in cells.values() for _, d in c})
  lengths = sorted({n for c in cells.values() for n, _ in c})
  labels = sorted(cells, key=results.series_order(rows))
  styles = _styles(labels)
  fig = Figure(figsize=(3.6 * len(depths) + 2.2, 3.6), layout='constrained')
  train_lens = sorted({r['train_len'] for r in rows})
  for i, depth in enumerate(depths):
    ax = fig.add_subplot(1, len(depths), i + 1)
    for label in labels:
      xs = [n for n in lengths if (n, depth) in cells[label]]
      ax.plot(xs, [np.mean(cells[label][(n, depth)]) for n in xs], label=label, **styles[label])
    for t in train_lens:
      ax.axvline(t, color='0.4', linewidth=1, linestyle=':')
    _plain_log_axes(ax, lengths, log_y=False)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f'needle depth {depth:g}', fontsize=9)
    ax.set_xlabel('context length (tokens)', fontsize=8)
    if i == 0:
      ax.set_ylabel('recall' if value == 'answer_accuracy' else value)
    ax.grid(True, alpha=0.3)
  _legend(ax)
  tasks = ', '.join(sorted({str(r.get('task')) for r in rows}))
  fig.suptitle(f'{tasks}: trained at L = {", ".join(map(str, train_lens))} (dotted)', fontsize=10)
  return fig


def extension_figure(ext_rows: Sequence[Row], lm_rows: Sequence[Row]) -> Figure:
  """One panel per (variant, scaling): eval-time only (dashed, black) beside each fine-tune."""
  series = results.extension_series(ext_rows, lm_rows)
  panels = sorted({(v, s) for v, s, _ in series}, key=lambda p: (p[0], results.scaling_rank(p[1])))
  methods = sorted({m for _, _, m in series if m != results.EVAL_TIME_ONLY})
  fig = Figure(figsize=(3.8 * len(panels) + 2.0, 3.8), layout='constrained')
  ax = None
  for i, (variant, scaling) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1, sharey=ax)
    for j, method in enumerate([results.EVAL_TIME_ONLY] + methods):
      entry = series.get((variant, scaling, method))
      if entry is None:
        continue
      xs = sorted(entry['ppl'])
      style = (dict(color='k', linestyle='--', marker='x') if method == results.EVAL_TIME_ONLY else
               dict(color=f'C{j % 10}', marker=_MARKERS[j % len(_MARKERS)]))
      label = method if method == results.EVAL_TIME_ONLY else f'{method} ({entry["steps"]} steps)'
      ax.plot(xs, [np.mean(entry['ppl'][n]) for n in xs], label=label, markersize=4, **style)
    lens = {e['train_len'] for (v, s, _), e in series.items() if (v, s) == (variant, scaling)}
    lens |= {e['len'] for (v, s, _), e in series.items() if (v, s) == (variant, scaling) and e['len']}
    for n in sorted(lens):
      ax.axvline(n, color='0.4', linewidth=1, linestyle=':')
    _plain_log_axes(ax, [n for (v, s, _), e in series.items() if (v, s) == (variant, scaling)
                                for n in e['ppl']], log_y=True)
    ax.set_title(f'{variant} + {scaling}', fontsize=9)
    ax.set_xlabel('evaluation length (tokens)', fontsize=8)
    if i == 0:
      ax.set_ylabel('perplexity')
    ax.grid(True, which='both', alpha=0.3)
  if ax is not None:
    _legend(ax)
  return fig
