"""Recall accuracy of a model on a retrieval task, teacher-forced, by context length and depth.

``recall_accuracy(apply_fn, task, length=…, depths=…, trials=…)`` takes any
``apply_fn(tokens, positions, segment_ids) -> logits`` (as :mod:`lcr.passkey` and
:mod:`lcr.evaluate` do) and a task of :mod:`lcr.data.tasks` (MQAR, passkey), so it serves every
positional encoding, evaluation-time scaling and token mixer. An answer counts as recalled when it is
the model's argmax given the correct prefix; an example is correct when every answer is.
``evaluate_task`` is the study's use of it: every length × depth × RoPE scaling of a trained model,
into passkey.jsonl or recall.jsonl.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import logging

from lcr import evaluate, passkey, results
from lcr.config import Config
from lcr.data import tasks

ApplyFn = passkey.ApplyFn
MODE = 'teacher_forced'


def recall_accuracy(apply_fn: ApplyFn, task: tasks.Task, *, length: int, depths: Sequence[float],
                    trials: int, seed: int = 0, batch_size: int = 8,
                    max_position: int | None = None) -> list[dict[str, Any]]:
  """One record per depth: depth, trials, correct (examples with every answer recalled),
  accuracy (= correct / trials) and answer_accuracy (recalled answers / answers).

  The examples are ``tasks.eval_examples(task, length, depths, trials, seed)``: the same for every
  model. ``batch_size`` examples per forward pass; ``max_position`` clamps positions (the explicit
  policy for a learned table past its trained rows).
  """
  examples = tasks.eval_examples(task, length, depths, trials, seed)
  tokens, targets, answers = tasks.stack(examples)
  correct, hits = passkey.score_tokens(apply_fn, tokens, answers, targets=targets,
                                       batch_size=batch_size, max_position=max_position)
  per_example = answers.sum(axis=1)
  out = []
  for i, depth in enumerate(depths):
    rows = slice(i * trials, (i + 1) * trials)
    out.append(dict(depth=float(depth), trials=trials, correct=int(correct[rows].sum()),
                    accuracy=float(correct[rows].mean()),
                    answer_accuracy=float(hits[rows].sum() / per_example[rows].sum())))
  return out


# ----------------------------------------------------------------------------------------------
# The study's evaluation of a model trained on a retrieval task.


def evaluate_task(config: Config, evaluator: evaluate.Evaluator, labels: dict[str, Any],
                  workdir: str, *, writer: bool = True) -> int:
  """Recall rows of a model trained on ``config.data.task``, for every RoPE scaling (RoPE models),
  length (eval.passkey_lengths, else the evaluation lengths) and depth (eval.passkey_depths), with
  eval.passkey_trials examples each; rows not yet in the workdir are appended (passkey.jsonl for
  the passkey task, recall.jsonl otherwise). Returns the number of rows written."""
  task = tasks.get_task(config.data)
  path = os.path.join(workdir, results.PASSKEY if task.name == 'passkey' else results.RECALL)
  done = {results.row_key(r, results.RECALL_KEY_FIELDS) for r in results.read_rows(path)}
  ec, train_len = config.eval, config.train.seq_len
  scalings = ec.rope_scalings if evaluator.model_cfg.pos == 'rope' else ('none',)
  written = 0
  for scaling in scalings:
    for length in ec.passkey_lengths or ec.eval_lengths(train_len):
      base = {**labels, 'pos': evaluator.model_cfg.pos, 'task': task.name, 'mode': MODE,
              'rope_scaling': scaling, 'train_len': train_len, 'eval_len': length}
      keys = {results.row_key({**base, 'depth': float(d)}, results.RECALL_KEY_FIELDS)
              for d in ec.passkey_depths}
      if keys <= done:
        continue
      model_cfg = evaluator.config(scaling, length)
      records = recall_accuracy(
          evaluator.apply_fn(model_cfg), task, length=length, depths=ec.passkey_depths,
          trials=ec.passkey_trials,
          batch_size=evaluate.windows_per_batch(ec.batch_size, train_len, length),
          max_position=evaluate.learned_position_limit(evaluator.model_cfg, ec, train_len, length))
      extra = ({'format': config.data.passkey_format} if task.name == 'passkey' else {})
      rows = [{**base, **extra, 'rope_factor': evaluate.effective_factor(model_cfg), **r,
               **({'digit_accuracy': r['answer_accuracy']} if task.name == 'passkey' else {})}
              for r in records]
      if writer:
        results.append_rows(path, rows)
      written += len(rows)
      logging.info('%s %s %s L=%d: recall %s', labels.get('variant'), task.name, scaling, length,
                   [round(r['accuracy'], 2) for r in records])
  return written
