"""The table of docs/memory_and_mixers.md, from a finished study's files alone.

  python experiments/directions_report.py --workdir=runs/directions

For every variant: what it is (mixer, memory, encoding), its parameters, perplexity at L, 8L and
32L (non-overlapping windows) and 32L over L of its language model, recall of its MQAR model
(examples with every answer recalled, and the fraction of answers) at each length, passkey
accuracy where passkey was evaluated, and the language model's training throughput (median tokens/s
of the logged steps after the first; the study's workers run one per core). Prints a Markdown
table, then one JSON object per variant.

On a shared machine the study's tokens/s depend on what else ran while each variant trained;
``--measure_steps=N`` times every variant's train step again in this process, in turns (each
variant ``--measure_rounds`` times, the best kept; benchmarks/train_throughput.py's timing), so
they see the same load: the column "measured tokens/s".
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'a study workdir', required=True)
_MEASURE_STEPS = flags.DEFINE_integer('measure_steps', 0, 'timed train steps per variant and '
                                      'round (0: report the study\'s logged tokens/s only)')
_MEASURE_ROUNDS = flags.DEFINE_integer('measure_rounds', 2, 'turns through the variants')
MULTIPLES = (1, 8, 32)


def describe(model) -> str:
  if model.memory != 'none':
    detail = (f'S={model.segment_length}, M={model.memory_length}' if model.memory == 'xl' else
              f'S={model.segment_length}, {model.memory_update}')
    return f'{model.memory} ({detail}), {model.pos}'
  return model.mixer if model.mixer != 'attention' else f'attention, {model.pos}'


def parameters(model) -> int:
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from lcr.model import TransformerLM
  shapes = jax.eval_shape(lambda: TransformerLM(model).init(jax.random.key(0),
                                                           jnp.zeros((1, 8), jnp.int32)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes['params'])))


def lm_dir(workdir: str, variant: str) -> str:
  """The variant's language model: models/lm-<variant> in a study with tasks, else models/<variant>."""
  with_task = os.path.join(workdir, 'models', f'lm-{variant}')
  return with_task if os.path.isdir(with_task) else os.path.join(workdir, 'models', variant)


def retrieval_by_length(rows: list[dict], variant: str, score: str) -> dict[int, dict]:
  """{eval_len: {'accuracy', score}} averaged over depths, teacher-forced rows of one variant."""
  by_length = {}
  for r in rows:
    if r['variant'] == variant and r.get('mode', 'teacher_forced') == 'teacher_forced':
      by_length.setdefault(r['eval_len'], []).append((r['accuracy'], r[score]))
  return {n: {'accuracy': sum(a for a, _ in v) / len(v), 'answers': sum(x for _, x in v) / len(v)}
          for n, v in sorted(by_length.items())}


def variant_rows(workdir: str) -> list[dict]:
  from lcr import checkpoint, metrics, results
  rows = [r for r in results.read_rows(os.path.join(workdir, results.RESULTS))
          if r['protocol'] == 'nonoverlapping' and r.get('rope_scaling', 'none') == 'none']
  passkey = results.read_rows(os.path.join(workdir, results.PASSKEY))
  recall = [r for r in results.read_rows(os.path.join(workdir, results.RECALL))
            if r.get('task') == 'mqar' and r.get('rope_scaling', 'none') == 'none']
  out = []
  for variant in dict.fromkeys(r['variant'] for r in rows):
    directory = lm_dir(workdir, variant)
    config = checkpoint.read_config(directory)
    train_len = config.train.seq_len
    ppl = {r['eval_len']: r['ppl'] for r in rows if r['variant'] == variant}
    speeds = [r['tokens_per_s'] for r in metrics.read_metrics(directory)
              if 'tokens_per_s' in r][1:]
    out.append(dict(
        variant=variant, model=describe(config.model), parameters=parameters(config.model),
        train_len=train_len,
        **{f'ppl_{m}L': ppl.get(m * train_len) for m in MULTIPLES},
        ppl_ratio_32L=(ppl[32 * train_len] / ppl[train_len]
                       if 32 * train_len in ppl and train_len in ppl else None),
        mqar=retrieval_by_length(recall, variant, 'answer_accuracy'),
        passkey=retrieval_by_length(passkey, variant, 'digit_accuracy'),
        tokens_per_s=sorted(speeds)[len(speeds) // 2] if speeds else None))
  return out


def measure(workdir: str, rows: list[dict], steps: int, rounds: int) -> None:
  """Adds ``measured_tokens_per_s`` to each row: its train step timed in turns with the others."""
  from benchmarks import train_throughput
  from lcr import checkpoint
  configs = {r['variant']: checkpoint.read_config(lm_dir(workdir, r['variant'])) for r in rows}
  best = dict.fromkeys(configs, 0.0)
  for _ in range(rounds):
    for variant, config in configs.items():
      tokens_per_s, _, _ = train_throughput.throughput(config, steps, repeats=1)
      best[variant] = max(best[variant], tokens_per_s)
  for r in rows:
    r['measured_tokens_per_s'] = best[r['variant']]


def markdown(rows: list[dict]) -> str:
  fmt = lambda x, f='{:.2f}': '—' if x is None else f.format(x)
  measured = all('measured_tokens_per_s' in r for r in rows)
  # (column title, row field, length): MQAR recall, then passkey, at each length evaluated.
  retrieval = [(f'{title} {n} (answers)', field, n)
               for title, field in (('MQAR', 'mqar'), ('passkey', 'passkey'))
               for n in sorted({int(n) for r in rows for n in r[field]})]
  head = ('| variant | model | parameters | ppl L | ppl 8L | ppl 32L | 32L / L | '
          + ''.join(f'{title} | ' for title, _, _ in retrieval) + 'train tokens/s |'
          + (' measured tokens/s |' if measured else ''))
  lines = [head, '|---|---|---:|---:|---:|---:|---:|' + '---:|' * len(retrieval) + '---:|'
           + '---:|' * measured]
  for r in rows:
    scores = [r[field].get(n) for _, field, n in retrieval]
    cells = [f"{k['accuracy']:.2f} ({k['answers']:.2f})" if k else '—' for k in scores]
    lines.append(f"| {r['variant']} | {r['model']} | {r['parameters']:,} | {fmt(r['ppl_1L'])} | "
                 f"{fmt(r['ppl_8L'])} | {fmt(r['ppl_32L'])} | {fmt(r['ppl_ratio_32L'])} | "
                 + ''.join(f'{c} | ' for c in cells) + f"{fmt(r['tokens_per_s'], '{:,.0f}')} |"
                 + (f" {r['measured_tokens_per_s']:,.0f} |" if measured else ''))
  return '\n'.join(lines)


def main(argv):
  del argv
  rows = variant_rows(_WORKDIR.value)
  if _MEASURE_STEPS.value:
    measure(_WORKDIR.value, rows, _MEASURE_STEPS.value, _MEASURE_ROUNDS.value)
  print(markdown(rows))
  for r in rows:
    print(json.dumps(r, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
