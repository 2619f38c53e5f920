"""Result files, the summary table and the figures (lcr.results, lcr.plots)."""

import json
import math

import matplotlib.image
import numpy as np
import pytest

from lcr import plots, results

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _row(variant, eval_len, ppl, seed=0, scaling='none', protocol='nonoverlapping', train_len=64):
  pos = variant
  return dict(variant=variant, pos=pos, seed=seed, rope_scaling=scaling, rope_factor=1.0,
              protocol=protocol, stride=train_len if protocol == 'sliding' else 0,
              train_len=train_len, eval_len=eval_len, loss=math.log(ppl), ppl=ppl,
              bpb=math.log(ppl) / math.log(2), tokens=1000, bytes=1000, split='validation',
              learned_positions='untrained' if variant == 'learned' else None)


def _rows():
  rows = []
  for seed, bump in ((0, 0.0), (1, 0.2)):
    for n, mult in ((64, 1.0), (128, 1.5), (512, 3.0)):
      rows.append(_row('alibi', n, 4.0 + bump, seed))
      rows.append(_row('learned', n, 4.0 * mult + bump, seed))
      rows.append(_row('rope', n, 4.0 * mult ** 0.5 + bump, seed))
      rows.append(_row('rope', n, 4.0 + bump, seed, scaling='yarn'))
  return rows


def test_jsonl_roundtrip_and_torn_last_line(tmp_path):
  path = str(tmp_path / 'results.jsonl')
  rows = _rows()
  results.append_rows(path, rows[:5])
  results.append_rows(path, rows[5:])
  with open(path, 'a') as f:
    f.write('{"variant": "alib')                       # an interrupted write
  back = results.read_rows(path)
  assert back == rows
  for row in back:
    results.check_result_row(row)
  assert {results.row_key(r) for r in back} == {results.row_key(r) for r in rows}
  with pytest.raises(ValueError, match='lacks'):
    results.check_result_row({k: v for k, v in rows[0].items() if k != 'bpb'})


def test_summary_table_mean_and_spread():
  text = results.summary_markdown(_rows())
  assert '| model | 64 | 128 | 512 |' in text
  alibi = next(line for line in text.splitlines() if line.startswith('| alibi |'))
  spread = np.std([4.0, 4.2], ddof=1)
  assert alibi == f'| alibi | 4.10 ± {spread:.2f} | 4.10 ± {spread:.2f} | 4.10 ± {spread:.2f} |'
  assert '| rope + yarn |' in text and 'mean ± std over 2 seeds' in text
  # Ratios pair each seed with its own train-length perplexity.
  learned_ratio = [line for line in text.splitlines() if line.startswith('| learned |')][1]
  ratios = [12 / 4, 12.2 / 4.2]
  assert learned_ratio.split('|')[4].strip() == (
      f'{np.mean(ratios):.2f} ± {np.std(ratios, ddof=1):.2f}')
  alibi_ratio = [line for line in text.splitlines() if line.startswith('| alibi |')][1]
  assert alibi_ratio == '| alibi | 1.00 ± 0.00 | 1.00 ± 0.00 | 1.00 ± 0.00 |'
  alibi_bpb = [line for line in text.splitlines() if line.startswith('| alibi |')][2]
  bpb = [math.log2(4.0), math.log2(4.2)]
  assert alibi_bpb.split('|')[2].strip() == f'{np.mean(bpb):.3f} ± {np.std(bpb, ddof=1):.3f}'
  assert 'untrained' in text


def _png_ok(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_extrapolation_figure_series_and_band(tmp_path):
  rows = _rows()
  fig = plots.extrapolation_figure(rows)
  ax = fig.axes[0]
  labels = [line.get_label() for line in ax.get_lines()]
  # Absolute encodings, then rotary (each RoPE scaling after its model), then biases.
  assert labels == ['learned', 'rope', 'rope + yarn', 'alibi', 'train length 64']
  learned = ax.get_lines()[0]
  np.testing.assert_allclose(learned.get_xdata(), [64, 128, 512])
  np.testing.assert_allclose(learned.get_ydata(), [4.1, 6.1, 12.1])
  assert ax.get_xscale() == 'log'
  assert ax.get_lines()[-1].get_xdata()[0] == 64             # the vertical line at L
  assert len(ax.collections) == 4                            # one seed band per series
  path = str(tmp_path / 'extrapolation.png')
  fig.savefig(path)
  _png_ok(path)


def test_draw_all_from_result_files_alone(tmp_path):
  work_a, work_b, out = tmp_path / 'a', tmp_path / 'b', tmp_path / 'out'
  rows = _rows()
  results.append_rows(str(work_a / results.RESULTS), [r for r in rows if r['seed'] == 0])
  results.append_rows(str(work_b / results.RESULTS), [r for r in rows if r['seed'] == 1])
  for work, seed in ((work_a, 0), (work_b, 1)):
    pp = []
    for r in rows:
      if r['seed'] == seed:
        n = r['eval_len']
        pp.append({**{k: r[k] for k in results.KEY_FIELDS}, 'pos': r['pos'],
                   'loss': list(np.linspace(1, 2, n)), 'count': [3] * n})
    results.append_rows(str(work / results.PER_POSITION), pp)
    results.append_rows(str(work / results.PASSKEY), [
        dict(variant=v, pos=v, seed=seed, rope_scaling='none', rope_factor=1.0, train_len=64,
             eval_len=n, depth=d, format='compact', trials=4, correct=2, accuracy=0.5,
             digit_accuracy=0.75) for v in ('alibi', 'rope') for n in (64, 128) for d in (0.0, 1.0)])
  written = plots.draw_all([str(work_a), str(work_b)], str(out))
  assert sorted(written) == ['extrapolation.png', 'passkey.png', 'per_position.png', 'summary.md']
  for name in ('extrapolation.png', 'passkey.png', 'per_position.png'):
    _png_ok(written[name])
  summary = open(written['summary.md']).read()
  assert 'over 2 seeds' in summary and 'Passkey' in summary
  pp_fig = plots.per_position_figure(results.read_many(
      [str(work_a / results.PER_POSITION), str(work_b / results.PER_POSITION)]))
  lines = pp_fig.axes[0].get_lines()
  assert [line.get_label() for line in lines][:4] == ['learned', 'rope', 'rope + yarn', 'alibi']
  assert max(lines[0].get_xdata()) <= 512 and min(lines[0].get_ydata()) >= 1.0
  # Positions pool every length: position 0 has loss 1 in every row, the last position only
  # appears in the 512-token windows (loss 2 there).
  assert lines[0].get_ydata()[0] == pytest.approx(1.0)
  assert 1.9 < lines[0].get_ydata()[-1] <= 2.0
  pk_fig = plots.passkey_figure(results.read_rows(str(work_a / results.PASSKEY)))
  assert [ax.get_title() for ax in pk_fig.axes[:2]] == ['rope', 'alibi']
  assert json.loads(open(work_a / results.RESULTS).readline())['variant'] == 'alibi'


def test_per_position_pools_lengths_only_for_the_same_model():
  rows = []
  for scaling in ('none', 'yarn'):
    for n, loss in ((128, 3.0), (512, 1.0)):
      rows.append(dict(variant='rope', pos='rope', seed=0, rope_scaling=scaling, protocol='nonoverlapping',
                       stride=0, train_len=64, eval_len=n, loss=[loss] * n, count=[2] * n,
                       rope_factor=1.0 if scaling == 'none' else n / 64))
  lines = {line.get_label(): line for line in plots.per_position_figure(rows).axes[0].get_lines()}
  # Unscaled RoPE is one model at every length: position 0 averages both lengths' windows.
  assert lines['rope'].get_ydata()[0] == pytest.approx(2.0)
  # YaRN's factor is eval_len / L: the 128-token windows ran another model, so only 512 counts.
  assert lines['rope + yarn'].get_ydata()[0] == pytest.approx(1.0)
