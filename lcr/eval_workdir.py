"""``run.py --mode=eval``: perplexity of one trained workdir over the ``eval`` grid, into eval.jsonl.

The grid (lengths × protocols × RoPE scalings) and the windowing are lcr.evaluate's; the model is
the one saved in the workdir, evaluated with the ``eval`` section of the config given now.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from lcr import checkpoint, evaluate, peft
from lcr.config import EvalConfig

EVAL_FILE = 'eval.jsonl'


def evaluate_workdir(workdir: str, eval_cfg: EvalConfig) -> list[dict[str, Any]]:
  """One row per (scaling, protocol, length): loss, ppl, bits per byte; appended to eval.jsonl.

  A run trained on a retrieval task (data.task) is scored on its task instead: recall by length ×
  depth × RoPE scaling into workdir/recall.jsonl (passkey.jsonl for the passkey task).
  """
  from lcr import data as data_lib  # only evaluation of a trained workdir needs the corpus

  params, saved = checkpoint.load_params(workdir)
  params, model_fn = peft.for_evaluation(params, saved.peft)   # LoRA merged into the base
  if saved.data.task != 'lm':
    from lcr import retrieval
    evaluator = evaluate.Evaluator(params, saved.model, eval_cfg, saved.train.seq_len, model_fn)
    retrieval.evaluate_task(dataclasses.replace(saved, eval=eval_cfg), evaluator,
                            {'variant': saved.model.pos, 'seed': saved.seed}, workdir,
                            writer=jax.process_index() == 0)
    return []
  tokenizer = data_lib.get_tokenizer(saved.data)
  split = data_lib.load_eval_tokens(saved.data, eval_cfg.split)
  stream = evaluate.stream_from_offsets(np.asarray(split.tokens, np.int32), split.doc_offsets)
  train_len = saved.train.seq_len
  evaluator = evaluate.Evaluator(params, saved.model, eval_cfg, train_len, model_fn)
  rows = []
  for task in evaluate.plan_tasks(saved.model, eval_cfg, train_len):
    start = time.perf_counter()
    scores = evaluator.perplexity(task, stream, tokenizer.byte_lengths())
    row = {**evaluator.task_fields(task), **evaluate.score_fields(scores), 'split': eval_cfg.split,
           'step': _step(workdir)}
    rows.append(row)
    logging.info('%s %s L=%d: loss %.4f ppl %.3f bpb %.3f (%d tokens, %.1f s)', task.rope_scaling,
                 task.protocol, task.eval_len, scores.loss, scores.ppl, scores.bpb, scores.tokens,
                 time.perf_counter() - start)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, EVAL_FILE), 'a') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
  return rows


def _step(workdir: str) -> int:
  steps = [int(d) for d in os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)) if d.isdigit()]
  return max(steps)
