"""The study's result files (JSON lines) and the perplexity summary table.

``results.jsonl``: one row per (variant, seed, train_len, rope_scaling, protocol, stride, eval_len):
  variant, pos, seed, rope_scaling, rope_factor, protocol, stride, train_len, eval_len,
  loss (mean NLL, nats/token), ppl, bpb (bits per UTF-8 byte), tokens, bytes, split,
  learned_positions (the policy for a learned table past train_len, null for other encodings).
``per_position.jsonl``: the same key fields plus ``loss`` and ``count``, lists over window positions.
``passkey.jsonl``: variant, pos, seed, rope_scaling, rope_factor, train_len, eval_len, depth, format,
  mode ('teacher_forced' or 'generate'), trials, correct, accuracy, digit_accuracy; rows of a model
  trained on the passkey task also carry task and answer_accuracy (lcr.retrieval).
``recall.jsonl``: retrieval-task rows (MQAR) with the fields of lcr.retrieval: variant, pos, seed,
  task, mode, rope_scaling, rope_factor, train_len, eval_len, depth, trials, correct, accuracy,
  answer_accuracy.
``extension.jsonl``: fine-tuned extensions, the fields of lcr.extend.
Rows are appended as each evaluation finishes, so an interrupted study resumes from the keys present.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from lcr.config import POSITIONAL_ENCODINGS

Row = dict[str, Any]
RESULTS, PER_POSITION, PASSKEY = 'results.jsonl', 'per_position.jsonl', 'passkey.jsonl'
RECALL, EXTENSION = 'recall.jsonl', 'extension.jsonl'
RESULT_FIELDS = ('variant', 'pos', 'seed', 'rope_scaling', 'rope_factor', 'protocol', 'stride',
                 'train_len', 'eval_len', 'loss', 'ppl', 'bpb', 'tokens', 'bytes', 'split',
                 'learned_positions')
KEY_FIELDS = ('variant', 'seed', 'train_len', 'rope_scaling', 'protocol', 'stride', 'eval_len')
PASSKEY_KEY_FIELDS = ('variant', 'seed', 'train_len', 'rope_scaling', 'eval_len', 'depth', 'task',
                      'mode')
RECALL_KEY_FIELDS = PASSKEY_KEY_FIELDS
EXTENSION_KEY_FIELDS = ('variant', 'seed', 'train_len', 'rope_scaling', 'finetune_method',
                        'finetune_steps', 'finetune_len', 'protocol', 'stride', 'eval_len')
# Values of fields that rows written before the field existed stand for.
FIELD_DEFAULTS = {'mode': 'teacher_forced'}


def append_rows(path: str, rows: Iterable[Row]) -> None:
  """Appends rows as JSON lines under an exclusive lock and flushes them to disk."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  text = ''.join(json.dumps(row, sort_keys=True) + '\n' for row in rows)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)   # worker processes of one study append to the same files
    try:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def read_rows(path: str) -> list[Row]:
  """Rows of a JSON-lines file ([] if missing); a torn last line from an interrupted write is skipped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return rows


def read_many(paths: Iterable[str]) -> list[Row]:
  return [row for p in paths for row in read_rows(p)]


def row_key(row: Row, fields: Sequence[str] = KEY_FIELDS) -> tuple:
  return tuple(row.get(f, FIELD_DEFAULTS.get(f)) for f in fields)


def check_result_row(row: Row) -> None:
  """Raises if a results.jsonl row lacks a field of the schema."""
  missing = [f for f in RESULT_FIELDS if f not in row]
  if missing:
    raise ValueError(f'results row lacks {missing}: {row}')


def series_label(row: Row) -> str:
  """'alibi', 'rope', 'rope + yarn', ...: a variant, and for RoPE the evaluation-time scaling;
  passkey rows scored by generation add ' (generated)'."""
  scaling = row.get('rope_scaling', 'none')
  label = row['variant'] if scaling in (None, 'none') else f"{row['variant']} + {scaling}"
  return label + (GENERATED if row.get('mode') == 'generate' else '')


GENERATED = ' (generated)'


SCALING_ORDER = ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn')


def series_order(rows: Iterable[Row]) -> Callable[[str], tuple]:
  """A sort key for series labels: variants by encoding (none, learned, sinusoidal, rope, xpos,
  alibi, t5, as in lcr.config.POSITIONAL_ENCODINGS), each RoPE variant's scalings after it."""
  pos_of = {r['variant']: r.get('pos') for r in rows}

  def key(label: str) -> tuple:
    generated = label.endswith(GENERATED)
    variant, _, scaling = label.removesuffix(GENERATED).partition(' + ')
    pos = pos_of.get(variant)
    pos_rank = POSITIONAL_ENCODINGS.index(pos) if pos in POSITIONAL_ENCODINGS else len(POSITIONAL_ENCODINGS)
    scaling = scaling or 'none'
    rank = SCALING_ORDER.index(scaling) if scaling in SCALING_ORDER else len(SCALING_ORDER)
    return pos_rank, variant, rank, scaling, generated
  return key


def aggregate(rows: Iterable[Row], value: str = 'ppl') -> dict[tuple, dict[int, list[float]]]:
  """{(protocol, train_len, label): {eval_len: [value per seed]}} (last row wins per key)."""
  latest = {row_key(r): r for r in rows}
  out: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
  for r in latest.values():
    out[(r['protocol'], r['train_len'], series_label(r))][r['eval_len']].append(float(r[value]))
  return out


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(values: Sequence[float], digits: int = 2) -> str:
  if not values:
    return ''
  mean, spread = mean_spread(values)
  if not math.isfinite(mean):
    return 'inf'
  text = f'{mean:.{digits}f}' if mean < 1e4 else f'{mean:.3g}'
  return text + (f' ± {spread:.{digits}f}' if len(values) > 1 else '')


def with_ratios(rows: Iterable[Row]) -> list[Row]:
  """Rows with ``ppl_ratio``: ppl over the same model's (variant, seed, scaling, protocol) ppl at
  eval_len = train_len; rows without that reference are left out."""
  latest = list({row_key(r): r for r in rows}.values())
  ref_fields = ('variant', 'seed', 'train_len', 'rope_scaling', 'protocol')
  base = {row_key(r, ref_fields): r['ppl'] for r in latest if r['eval_len'] == r['train_len']}
  return [{**r, 'ppl_ratio': r['ppl'] / base[row_key(r, ref_fields)]} for r in latest
          if row_key(r, ref_fields) in base]


def _table(series: dict[str, dict[int, list[float]]], lengths: list[int], digits: int,
           order: Callable[[str], tuple]) -> list[str]:
  lines = ['| model | ' + ' | '.join(str(n) for n in lengths) + ' |',
           '|---|' + '---:|' * len(lengths)]
  for label in sorted(series, key=order):
    lines.append(f'| {label} | ' + ' | '.join(_fmt(series[label].get(n, []), digits)
                                              for n in lengths) + ' |')
  return lines


def summary_markdown(rows: Sequence[Row], passkey_rows: Sequence[Row] = (),
                     recall_rows: Sequence[Row] = (), extension_rows: Sequence[Row] = ()) -> str:
  """Perplexity tables (rows = variants and RoPE scalings, columns = evaluation lengths), then
  retrieval (passkey, recall) and context-extension tables when there are such rows."""
  out = ['# Train short, test long', '']
  groups = aggregate(rows, 'ppl')
  ratio_groups = aggregate(with_ratios(rows), 'ppl_ratio')
  bpb_groups = aggregate(rows, 'bpb')
  order = series_order(rows)
  seeds = {r.get('seed') for r in rows}
  note = f' (mean ± std over {len(seeds)} seeds)' if len(seeds) > 1 else ''
  for protocol, train_len in sorted({(p, t) for p, t, _ in groups}):
    series = {lab: v for (p, t, lab), v in groups.items() if (p, t) == (protocol, train_len)}
    lengths = sorted({n for v in series.values() for n in v})
    stride = {r['stride'] for r in rows if r['protocol'] == protocol and r['train_len'] == train_len}
    extra = f', stride {sorted(stride)[0]}' if protocol == 'sliding' and len(stride) == 1 else ''
    out += [f'## Perplexity, {protocol} windows{extra}, trained at L = {train_len}{note}', '']
    out += _table(series, lengths, 2, order) + ['']
    ratios = {lab: v for (p, t, lab), v in ratio_groups.items() if (p, t) == (protocol, train_len)}
    if ratios:
      out += [f'Perplexity relative to the same model at L = {train_len}:', '']
      out += _table(ratios, lengths, 2, order) + ['']
    bpb = {lab: v for (p, t, lab), v in bpb_groups.items() if (p, t) == (protocol, train_len)}
    out += ['Bits per byte (comparable across tokenizers):', '']
    out += _table(bpb, lengths, 3, order) + ['']
  if passkey_rows:
    out += passkey_markdown(passkey_rows)
    out += depth_markdown(passkey_rows, 'accuracy', 'Passkey accuracy (whole key)')
  if recall_rows:
    out += depth_markdown(recall_rows, 'answer_accuracy', 'Recall (answers recalled)')
  out += extension_markdown(extension_rows, rows)
  policies = {r.get('learned_positions') for r in rows} - {None}
  if policies:
    out += [f'Learned positions past L: {", ".join(sorted(policies))} '
            '(see `learned_positions` in results.jsonl).', '']
  return '\n'.join(out)


def passkey_markdown(rows: Sequence[Row]) -> list[str]:
  """Passkey accuracy averaged over depths: rows = variants, columns = context lengths."""
  latest = {row_key(r, PASSKEY_KEY_FIELDS): r for r in rows}
  acc: dict[str, dict[int, dict[Any, list[float]]]] = defaultdict(lambda: defaultdict(
      lambda: defaultdict(list)))
  for r in latest.values():
    acc[series_label(r)][r['eval_len']][r.get('seed')].append(r['accuracy'])
  series = {lab: {n: [float(np.mean(v)) for v in by_seed.values()] for n, by_seed in d.items()}
            for lab, d in acc.items()}
  lengths = sorted({n for v in series.values() for n in v})
  return (['## Passkey retrieval accuracy (mean over depths)', '']
          + _table(series, lengths, 2, series_order(rows)) + [''])


# ----------------------------------------------------------------------------------------------
# Retrieval (recall.jsonl, passkey.jsonl) and extension (extension.jsonl) tables.

EVAL_TIME_ONLY = 'eval-time only'


def _latest(rows: Sequence[Row], fields: Sequence[str]) -> list[Row]:
  return list({row_key(r, fields): r for r in rows}.values())


def recall_cells(rows: Sequence[Row], value: str) -> dict[str, dict[tuple, list[float]]]:
  """{series label: {(eval_len, depth): [value per seed]}}."""
  cells: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
  for r in _latest(rows, RECALL_KEY_FIELDS):
    cells[series_label(r)][(r['eval_len'], r['depth'])].append(float(r[value]))
  return cells


def middle_depth(rows: Sequence[Row]) -> float:
  """The evaluated depth closest to 0.5."""
  return min({float(r['depth']) for r in rows}, key=lambda d: (abs(d - 0.5), d))


def depth_markdown(rows: Sequence[Row], value: str, title: str) -> list[str]:
  """Series × length table of ``value`` (in %) at the middle depth, and averaged over depths."""
  cells = recall_cells(rows, value)
  depth = middle_depth(rows)
  lengths = sorted({n for c in cells.values() for n, _ in c})
  order = series_order(rows)
  at_depth = {lab: {n: [100 * v for v in c[(n, depth)]] for n in lengths if (n, depth) in c}
              for lab, c in cells.items()}
  depths = sorted({d for c in cells.values() for _, d in c})
  mean = {lab: {n: [100 * float(np.mean([np.mean(c[(n, d)]) for d in depths if (n, d) in c]))]
                for n in lengths} for lab, c in cells.items()}
  out = [f'## {title} (%), depth {depth:g}', '']
  out += _table(at_depth, lengths, 0, order) + ['']
  out += [f'{title} (%), mean over depths {", ".join(f"{d:g}" for d in depths)}:', '']
  return out + _table(mean, lengths, 0, order) + ['']


def _final_steps(ext_rows: Sequence[Row]) -> list[Row]:
  """Non-overlapping rows of each fine-tune's last evaluated step."""
  rows = [r for r in _latest(ext_rows, EXTENSION_KEY_FIELDS) if r['protocol'] == 'nonoverlapping']
  last: dict[tuple, int] = defaultdict(int)
  for r in rows:
    key = (r['variant'], r['rope_scaling'], r['finetune_method'])
    last[key] = max(last[key], r['finetune_steps'])
  return [r for r in rows
          if r['finetune_steps'] == last[(r['variant'], r['rope_scaling'], r['finetune_method'])]]


def extension_series(ext_rows: Sequence[Row], lm_rows: Sequence[Row]) -> dict[tuple, dict]:
  """{(variant, scaling, method): {'steps', 'len', 'trainable', 'ppl': {eval_len: [ppl]}}}: the
  fine-tunes at their last step, and each (variant, scaling)'s evaluation-time-only curve (method
  EVAL_TIME_ONLY)."""
  out: dict[tuple, dict] = {}
  for r in _final_steps(ext_rows):
    key = (r['variant'], r['rope_scaling'], r['finetune_method'])
    entry = out.setdefault(key, {'steps': r['finetune_steps'], 'len': r['finetune_len'],
                                 'train_len': r['train_len'],
                                 'trainable': r['trainable_params'] / r['total_params'],
                                 'ppl': defaultdict(list)})
    entry['ppl'][r['eval_len']].append(float(r['ppl']))
  wanted = {(v, s) for v, s, _ in out}
  for r in _latest(lm_rows, KEY_FIELDS):
    if r['protocol'] == 'nonoverlapping' and (r['variant'], r['rope_scaling']) in wanted:
      entry = out.setdefault((r['variant'], r['rope_scaling'], EVAL_TIME_ONLY), {
          'steps': 0, 'len': None, 'train_len': r['train_len'], 'trainable': 0.0,
          'ppl': defaultdict(list)})
      entry['ppl'][r['eval_len']].append(float(r['ppl']))
  return out


def scaling_rank(scaling: str) -> int:
  """Position of a RoPE scaling in SCALING_ORDER (unknown ones last)."""
  return SCALING_ORDER.index(scaling) if scaling in SCALING_ORDER else len(SCALING_ORDER)


def extension_markdown(ext_rows: Sequence[Row], lm_rows: Sequence[Row]) -> list[str]:
  """Perplexity per (scaling, method) at every evaluation length, before and after fine-tuning."""
  series = extension_series(ext_rows, lm_rows)
  if not series:
    return []
  lengths = sorted({n for e in series.values() for n in e['ppl']})
  new_lens = sorted({e['len'] for e in series.values() if e['len']})
  out = ['## Context extension by fine-tuning', '',
         f'Perplexity; fine-tuned at {", ".join(map(str, new_lens))} tokens from the model trained '
         f'at L = {", ".join(str(t) for t in sorted({e["train_len"] for e in series.values()}))}. '
         f'"{EVAL_TIME_ONLY}" is the trained model with the scaling applied at evaluation '
         '(factor = length / L, results.jsonl); the fine-tuned models keep the factor they were '
         'tuned with.', '',
         '| variant | scaling | method | steps | trainable | ' + ' | '.join(map(str, lengths)) + ' |',
         '|---|---|---|---:|---:|' + '---:|' * len(lengths)]
  def order(key):
    variant, scaling, method = key
    return variant, scaling_rank(scaling), method != EVAL_TIME_ONLY, method

  for key in sorted(series, key=order):
    e = series[key]
    cells = ' | '.join(_fmt(e['ppl'].get(n, [])) for n in lengths)
    trainable = f'{100 * e["trainable"]:.1f} %' if key[2] != EVAL_TIME_ONLY else '—'
    out.append(f'| {key[0]} | {key[1]} | {key[2]} | {e["steps"]} | {trainable} | {cells} |')
  return out + [''] + extension_steps_markdown(ext_rows, series)


def extension_steps_markdown(ext_rows: Sequence[Row], series: dict[tuple, dict]) -> list[str]:
  """Perplexity at the fine-tuning length after each evaluated number of steps (0: eval-time only)."""
  rows = [r for r in _latest(ext_rows, EXTENSION_KEY_FIELDS)
          if r['protocol'] == 'nonoverlapping' and r['eval_len'] == r['finetune_len']]
  steps = sorted({r['finetune_steps'] for r in rows})
  if len(steps) < 2:
    return []
  table: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
  for r in rows:
    table[(r['variant'], r['rope_scaling'], r['finetune_method'])][r['finetune_steps']].append(r['ppl'])
  out = ['Perplexity at the fine-tuning length by fine-tuning steps (0: evaluation-time scaling only):',
         '', '| variant | scaling | method | ' + ' | '.join(['0'] + [str(n) for n in steps]) + ' |',
         '|---|---|---|' + '---:|' * (len(steps) + 1)]
  for key in sorted(table, key=lambda k: (k[0], scaling_rank(k[1]), k[2])):
    length = next(r['finetune_len'] for r in rows if (r['variant'], r['rope_scaling']) == key[:2])
    before = series.get((key[0], key[1], EVAL_TIME_ONLY), {'ppl': {}})['ppl'].get(length, [])
    cells = [_fmt(before)] + [_fmt(table[key].get(n, [])) for n in steps]
    out.append(f'| {key[0]} | {key[1]} | {key[2]} | ' + ' | '.join(cells) + ' |')
  return out + ['']
