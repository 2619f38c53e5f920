"""Passkey retrieval teacher-forced and by generation, side by side, for trained models.

    python experiments/passkey_modes.py --workdirs=runs/retrieval/models/passkey-rope,runs/retrieval/models/passkey-alibi

For each model and each of ``--lengths`` (default: L, 2L, 4L, 8L of the model's training length)
scores the passkey prompt (lcr/passkey.py, the model's ``data.passkey_format``) both ways:
teacher-forced (every key token is the argmax given the true prefix) and by greedily generating the
key with the KV cache (exact match). Prints whole-key accuracy averaged over ``--depths``, a
Markdown table, then one JSON line per (model, scaling, length, mode).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIRS = flags.DEFINE_list('workdirs', ['runs/retrieval/models/passkey-rope'], 'trained models')
_LENGTHS = flags.DEFINE_list('lengths', [], 'context lengths (default: 1, 2, 4, 8 × L)')
_SCALINGS = flags.DEFINE_list('rope_scalings', ['none', 'yarn'], 'RoPE scalings (RoPE models)')
_DEPTHS = flags.DEFINE_list('depths', ['0', '0.5', '1'], 'needle depths')
_TRIALS = flags.DEFINE_integer('trials', 16, 'examples per depth')


def main(argv):
  del argv
  import numpy as np
  from lcr import checkpoint, evaluate
  from lcr.data.tokenizers import get_tokenizer
  rows = []
  for workdir in _WORKDIRS.value:
    params, saved = checkpoint.load_params(workdir)
    train_len = saved.train.seq_len
    lengths = [int(x) for x in _LENGTHS.value] or [train_len * m for m in (1, 2, 4, 8)]
    eval_cfg = dataclasses.replace(
        saved.eval, passkey_depths=tuple(float(d) for d in _DEPTHS.value),
        passkey_trials=_TRIALS.value, passkey_format=saved.data.passkey_format)
    evaluator = evaluate.Evaluator(params, saved.model, eval_cfg, train_len)
    tokenizer = get_tokenizer(saved.data)
    scalings = _SCALINGS.value if saved.model.pos == 'rope' else ['none']
    name = os.path.basename(os.path.normpath(workdir))
    for scaling in scalings:
      for length in lengths:
        for mode in ('teacher_forced', 'generate'):
          records = evaluator.passkey(scaling, length, tokenizer, tokenizer.bos_id, mode)
          row = dict(model=name, pos=saved.model.pos, rope_scaling=scaling, train_len=train_len,
                     eval_len=length, mode=mode,
                     accuracy=float(np.mean([r['accuracy'] for r in records])),
                     digit_accuracy=float(np.mean([r['digit_accuracy'] for r in records])))
          rows.append(row)
          print(f"{name:24s} {scaling:8s} {length:6d} {mode:15s} whole key {row['accuracy']:.2f}",
                flush=True)
  lengths = sorted({r['eval_len'] for r in rows})
  print('\n| model | scaling | mode | ' + ' | '.join(str(n) for n in lengths) + ' |')
  print('|---|---|---|' + '---:|' * len(lengths))
  keys = sorted({(r['model'], r['rope_scaling'], r['mode']) for r in rows}, key=lambda k: k)
  for key in keys:
    cells = {r['eval_len']: r['accuracy'] for r in rows if (r['model'], r['rope_scaling'], r['mode']) == key}
    print(f'| {key[0]} | {key[1]} | {key[2]} | '
          + ' | '.join(f'{100 * cells[n]:.0f} %' if n in cells else '—' for n in lengths) + ' |')
  print()
  for row in rows:
    print(json.dumps(row))


if __name__ == '__main__':
  app.run(main)
