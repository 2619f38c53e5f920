"""DeepNorm against pre-LN and post-LN at depth: 24 layers of d_model 64 on the Bible as bytes.

    python experiments/deepnorm_depth.py --workdir=runs/deepnorm            # a few minutes, 2 cores
    python experiments/deepnorm_depth.py --workdir=runs/deepnorm --lr=1e-3 --steps=400

Trains one model per ``model.norm_placement`` (pre, post, deepnorm) with everything else equal
(seed, data order, AdamW schedule, 24 RoPE layers of d_model 64, T = 64, batch 16, scanned layers),
then prints the training loss at a few steps, the validation loss after the last step and the
largest gradient norm, as a table and one JSON object per placement. Finished runs in the workdir
are reused (delete ``WORKDIR/<placement>`` to train it again).
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from lcr import cli, metrics, train  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'where the runs go (one directory per placement)')
_PLACEMENTS = flags.DEFINE_list('placements', ['pre', 'post', 'deepnorm'], 'norm placements')
_LAYERS = flags.DEFINE_integer('layers', 24, 'model.num_layers')
_STEPS = flags.DEFINE_integer('steps', 300, 'training steps')
_LR = flags.DEFINE_float('lr', 1e-3, 'peak learning rate')
_WARMUP = flags.DEFINE_integer('warmup', 100, 'linear warmup steps')
_SEED = flags.DEFINE_integer('seed', 0, 'seed of the parameters and the data order')


def config(placement: str):
  return cli.load('configs/lm.py:cpu', [
      f'model.norm_placement={placement}', f'model.num_layers={_LAYERS.value}', 'model.d_model=64',
      'model.num_heads=4', 'model.pos=rope', 'model.scan_layers=true', f'seed={_SEED.value}',
      f'train.steps={_STEPS.value}', f'train.lr={_LR.value}', f'train.warmup_steps={_WARMUP.value}',
      'train.batch_size=16', 'train.seq_len=64', 'train.log_every=10', 'train.eval_every=0',
      'train.checkpoint_every=0', 'train.keep_checkpoints=1', 'train.eval_batches=8',
      'train.tensorboard=false'])


def summarize(placement: str, records: list[dict]) -> dict:
  losses = {r['step']: r['loss'] for r in records if 'loss' in r}
  marks = [s for s in (10, 50, 100, 200, _STEPS.value) if s in losses]
  val = [r['val_loss'] for r in records if 'val_loss' in r]
  return dict(placement=placement, layers=_LAYERS.value, d_model=64, steps=_STEPS.value,
              lr=_LR.value, loss_at={s: losses[s] for s in marks},
              val_loss=val[-1] if val else math.nan,
              max_grad_norm=max(r['grad_norm'] for r in records if 'grad_norm' in r))


def main(argv):
  if len(argv) > 1 or not _WORKDIR.value:
    cli.exit_with('deepnorm_depth.py', '--workdir=DIR is required (and nothing positional)')
  logging.set_verbosity(logging.INFO)
  rows = []
  with cli.one_line_errors('deepnorm_depth.py'):
    for placement in _PLACEMENTS.value:
      workdir = os.path.join(_WORKDIR.value, placement)
      train.train_and_evaluate(config(placement), workdir)
      rows.append(summarize(placement, metrics.read_metrics(workdir)))
      logging.info('%s done', placement)
  marks = list(rows[0]['loss_at'])
  print(f'\n{_LAYERS.value} layers, d_model 64, {_STEPS.value} steps, lr {_LR.value:g}, '
        f'warmup {_WARMUP.value}: training loss (nats/byte) at step')
  print(f'{"placement":<10}' + ''.join(f'{s:>8}' for s in marks) + f'{"val":>8}{"max |g|":>9}')
  for r in rows:
    print(f'{r["placement"]:<10}' + ''.join(f'{r["loss_at"][s]:>8.3f}' for s in marks)
          + f'{r["val_loss"]:>8.3f}{r["max_grad_norm"]:>9.2f}')
  for r in rows:
    print(json.dumps(r))


if __name__ == '__main__':
  app.run(main)
