"""The length-generalisation study behind experiments/length_generalization.py.

Each variant (a training tip, an attention kind, a decoder-only encoding, …: overrides of the shared
config) trains one model on lengths ≤ N of the task and is decoded at every test length with every
strategy of ``seq2seq.eval_decodes``. RL variants fine-tune another variant's model (``rl.init``
names it) and run after the others. A study workdir holds:

  models/<variant>/     checkpoints, config.json, metrics.jsonl
  results.jsonl         one row per (variant, seed, decode, test length), appended as each finishes
  length_generalization.png, summary.md    drawn from results.jsonl alone (lcr.seq2seq.report)
  study.json            the study's config; logs/<variant>.log of worker processes

Re-running the same command reuses finished models and rows, resumes an interrupted training from
its last checkpoint, and evaluates what is missing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from lcr import results
from lcr import study as lm_study
from lcr.config import Config, ConfigError, from_config_dict
from lcr.seq2seq import report, tasks

STUDY_FILE = 'study.json'
KEY_FIELDS = ('variant', 'seed', 'task', 'train_len', 'decode', 'test_len')


@dataclasses.dataclass(frozen=True)
class Study:
  """The ``study`` section: variant names, their overrides, worker processes.

  ``overrides`` may hold variants that ``variants`` leaves out (a preset's catalogue), so
  ``--config.study.variants=a,b`` runs a subset.
  """
  variants: tuple[str, ...]
  overrides: Mapping[str, Any]
  parallel: int = 1

  def __post_init__(self):
    lm_study.check_variant_names(self.variants)
    if self.parallel < 1:
      raise ConfigError(f'config field study.parallel={self.parallel} is invalid: must be >= 1')


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], Study]:
  values = config.to_dict() if hasattr(config, 'to_dict') else copy.deepcopy(dict(config))
  section = dict(values.pop('study', {}))
  known = {f.name for f in dataclasses.fields(Study)}
  if set(section) - known:
    raise ConfigError(f'config field study.{sorted(set(section) - known)[0]} does not exist; '
                      f'fields of study are: {", ".join(sorted(known))}')
  variants = section.get('variants', ())
  variants = variants.split(',') if isinstance(variants, str) else variants
  section['variants'] = tuple(v.strip() for v in variants if v.strip())
  section['overrides'] = dict(section.get('overrides') or {})
  return values, Study(**section)


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
  out = dict(base)
  for k, v in overrides.items():
    out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
  return out


def model_dir(workdir: str, variant: str) -> str:
  return lm_study.model_dir(workdir, variant)


def variant_config(values: Mapping[str, Any], study: Study, variant: str, workdir: str) -> Config:
  """One variant's run config: the vocabulary of the tasks, and ``rl.init`` resolved to the
  model directory when it names another variant of the study."""
  merged = _merge(copy.deepcopy(dict(values)), study.overrides.get(variant, {}))
  merged = _merge(merged, {'model': {'vocab_size': tasks.VOCAB_SIZE}})
  init = merged.get('seq2seq', {}).get('rl', {}).get('init', '')
  if init in study.variants:
    if init == variant:
      raise ConfigError(f'config field seq2seq.rl.init={init!r} of variant {variant!r} names itself')
    merged = _merge(merged, {'seq2seq': {'rl': {'init': model_dir(workdir, init)}}})
  return from_config_dict(merged)


def is_rl(config: Config) -> bool:
  return config.seq2seq.rl.steps > 0


def train_variant(config: Config, directory: str) -> None:
  from lcr.seq2seq import rl, train   # training is only needed when a model is missing
  steps = config.seq2seq.rl.steps if is_rl(config) else config.train.steps
  if lm_study.is_trained(directory, steps):
    logging.info('reusing the trained model in %s', directory)
    return
  start = time.perf_counter()
  (rl.finetune if is_rl(config) else train.train)(config, directory)
  logging.info('trained %s in %.1f s', directory, time.perf_counter() - start)


def row_fields(config: Config, variant: str) -> dict[str, Any]:
  s = config.seq2seq
  return {'variant': variant, 'tip': variant, 'seed': config.seed, 'task': s.task.name,
          'arch': config.model.arch, 'pos': config.model.pos, 'train_len': s.task.train_len,
          'training': s.training, 'cross_attention': s.cross_attention, 'pointer': s.pointer,
          'guided_weight': s.guided_weight, 'rl_steps': s.rl.steps,
          'rl_init': os.path.basename(os.path.normpath(s.rl.init)) if s.rl.steps else None}


def evaluate_variant(config: Config, variant: str, workdir: str) -> int:
  """Appends the rows this variant lacks; returns how many it wrote."""
  from lcr.seq2seq import arch as arch_lib
  from lcr.seq2seq import bleu, evaluate, train
  path = os.path.join(workdir, results.RESULTS)
  done = {results.row_key(r, KEY_FIELDS) for r in results.read_rows(path)}
  base = row_fields(config, variant)
  todo = [(d, n) for d in config.seq2seq.eval_decodes for n in config.seq2seq.task.test_lengths
          if results.row_key({**base, 'decode': d, 'test_len': n}, KEY_FIELDS) not in done]
  if not todo:
    return 0
  params = train.restore_params(model_dir(workdir, variant), config, field='study.variants')
  generator = evaluate.Generator.for_lengths(arch_lib.make(config), config,
                                             config.seq2seq.task.test_lengths)
  signature = bleu.signatures()['corpus']
  for decode, length in todo:
    start = time.perf_counter()
    scores = evaluate.evaluate(generator, params, config, decode, length)
    row = {**base, 'decode': decode, 'test_len': length, **scores, 'bleu_signature': signature}
    if _writer():
      results.append_rows(path, [row])
    logging.info('%s %s n=%d: exact %.3f, token accuracy %.3f, BLEU %.1f (%.1f s)', variant, decode,
                 length, scores['exact_match'], scores['token_accuracy'], scores['bleu'],
                 time.perf_counter() - start)
  return len(todo)


def run_variant(values: Mapping[str, Any], study: Study, variant: str, workdir: str) -> None:
  config = variant_config(values, study, variant, workdir)
  train_variant(config, model_dir(workdir, variant))
  evaluate_variant(config, variant, workdir)


def waves(values: Mapping[str, Any], study: Study, workdir: str) -> list[list[str]]:
  """Variants in the order they can run: the ones that train from scratch, then RL fine-tuning."""
  rl = [v for v in study.variants if is_rl(variant_config(values, study, v, workdir))]
  return [w for w in ([v for v in study.variants if v not in rl], rl) if w]


def run_study(config: Mapping[str, Any], workdir: str, *, worker_argv: Sequence[str] | None = None,
              only: str | None = None, plots_only: bool = False) -> dict[str, str]:
  """The whole study (or one variant with ``only``); returns the files drawn from the results."""
  values, study = split_config(config)
  os.makedirs(workdir, exist_ok=True)
  if only is not None:
    if only not in study.variants:
      raise ConfigError(f'--only={only!r} is not one of study.variants={study.variants}')
    lm_study.pin_worker()
    run_variant(values, study, only, workdir)
    return {}
  if not plots_only:
    if _writer():
      with open(os.path.join(workdir, STUDY_FILE), 'w') as f:
        json.dump(dict(config.to_dict() if hasattr(config, 'to_dict') else config), f, indent=2,
                  default=list)
    start = time.perf_counter()
    for wave in waves(values, study, workdir):
      if study.parallel > 1 and worker_argv is not None and len(wave) > 1:
        lm_study.run_parallel(worker_argv, wave, workdir, study.parallel)
      else:
        for variant in wave:
          run_variant(values, study, variant, workdir)
    logging.info('study finished in %.1f s', time.perf_counter() - start)
  return report.draw_all([workdir], workdir) if _writer() else {}


def _writer() -> bool:
  import jax
  return jax.process_index() == 0
