"""MoE routing before and after training: dropped fraction and expert load at two capacity factors.

    python experiments/moe_routing.py --workdir=runs/moe_routing           # a few minutes, 2 cores
    python experiments/moe_routing.py --workdir=runs/moe_routing --capacity_factors=1.0,1.25,0

Trains a 4-layer byte-level LM on the Bible (d_model 128, T = 128, batch 16) whose every FFN is a
mixture of 8 GELU experts of width 256, top-2, once per capacity factor, and a dense model with the
same active parameters (one GELU FFN of width 512), all with the same seed and data order. From each
run's metrics.jsonl it prints, at step 1 (the initial router: a step's metrics come from the
parameters it starts from) and at the last step, the fraction of routing assignments dropped, the
load-balance loss and each MoE layer's expert load (max / mean tokens per expert), plus the final
validation loss; a table and one JSON object per run. Finished runs in the workdir are reused.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from lcr import cli, metrics, train  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'where the runs go (one directory per run)')
_FACTORS = flags.DEFINE_list('capacity_factors', ['1.0', '1.25'], 'moe.capacity_factor per run')
_STEPS = flags.DEFINE_integer('steps', 400, 'training steps')
_DENSE = flags.DEFINE_bool('dense', True,
                           'also train the dense model with the same active parameters')

COMMON = ['model.num_layers=4', 'model.d_model=128', 'model.num_heads=4', 'model.pos=rope',
          'train.batch_size=16', 'train.seq_len=128', 'train.lr=2e-3', 'train.warmup_steps=50',
          'train.log_every=1', 'train.eval_every=0', 'train.checkpoint_every=0',
          'train.keep_checkpoints=1', 'train.eval_batches=8', 'train.tensorboard=false']


def runs() -> dict[str, list[str]]:
  out = {f'moe_cf{cf}': ['model.ffn=moe', 'model.ffn_dim=256', 'model.moe.num_experts=8',
                         'model.moe.top_k=2', f'model.moe.capacity_factor={cf}']
         for cf in _FACTORS.value}
  if _DENSE.value:
    out['dense'] = ['model.ffn=mlp', 'model.ffn_dim=512']
  return out


def summarize(name: str, records: list[dict]) -> dict:
  first, last = records[0], [r for r in records if 'loss' in r][-1]
  row = dict(run=name, steps=last['step'], loss=last['loss'],
             val_loss=[r['val_loss'] for r in records if 'val_loss' in r][-1])
  for when, r in (('start', first), ('end', last)):
    if 'moe_dropped_fraction' in r:
      row[f'dropped_{when}'] = r['moe_dropped_fraction']
      row[f'balance_loss_{when}'] = r['moe_balance_loss']
      row[f'load_{when}'] = [r[k] for k in sorted(r) if k.startswith('moe_expert_load_layer_')]
  return row


def main(argv):
  if len(argv) > 1 or not _WORKDIR.value:
    cli.exit_with('moe_routing.py', '--workdir=DIR is required (and nothing positional)')
  logging.set_verbosity(logging.INFO)
  rows = []
  with cli.one_line_errors('moe_routing.py'):
    for name, overrides in runs().items():
      workdir = os.path.join(_WORKDIR.value, name)
      config = cli.load('configs/lm.py:cpu', COMMON + overrides + [f'train.steps={_STEPS.value}'])
      train.train_and_evaluate(config, workdir)
      rows.append(summarize(name, metrics.read_metrics(workdir)))
  print(f'\n4 layers, d_model 128, T 128, {_STEPS.value} steps; start = step 1 (initial router)')
  print(f'{"run":<12}{"dropped":>16}{"balance loss":>16}{"expert load max/mean per layer":>52}'
        f'{"val":>8}')
  print(f'{"":<12}{"start → end":>16}{"start → end":>16}{"start → end":>52}')
  for r in rows:
    if 'dropped_start' in r:
      load = (' '.join(f'{x:.2f}' for x in r['load_start']) + ' → '
              + ' '.join(f'{x:.2f}' for x in r['load_end']))
      print(f'{r["run"]:<12}{r["dropped_start"]:>7.1%} → {r["dropped_end"]:>6.1%}'
            f'{r["balance_loss_start"]:>8.3f} → {r["balance_loss_end"]:.3f}{load:>52}'
            f'{r["val_loss"]:>8.3f}')
    else:
      print(f'{r["run"]:<12}{"":>16}{"":>16}{"":>52}{r["val_loss"]:>8.3f}')
  for r in rows:
    print(json.dumps(r))


if __name__ == '__main__':
  app.run(main)
