"""The "train short, test long" study behind experiments/extrapolation.py.

One model per variant (a positional encoding, everything else equal, same seed and data order) is
trained at L and evaluated at every length of ``eval``, under every RoPE scaling for RoPE models.
A study workdir holds:

  models/<variant>/     the trained model (checkpoints, config.json, metrics.jsonl)
  results.jsonl, per_position.jsonl, passkey.jsonl   appended as each evaluation finishes
  extrapolation.png, per_position.png, passkey.png, summary.md   drawn from those files alone
  study.json            the study's full config; logs/<variant>.log for worker processes

Re-running with the same workdir skips finished models and evaluations whose rows exist, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from lcr import evaluate, passkey, plots, results, retrieval
from lcr.config import Config, ConfigError, check_choice, from_config_dict

MODELS_DIR, LOGS_DIR, STUDY_FILE = 'models', 'logs', 'study.json'
# Eval-time model fields: changing them re-evaluates a trained model, it does not retrain it.
EVAL_TIME_FIELDS = ('yarn_beta_fast', 'yarn_beta_slow', 'attention_backend')
SINGLE_THREAD_XLA_FLAGS = '--xla_cpu_multi_thread_eigen=false'


class StudyError(Exception):
  """A variant's worker process failed; the message names it and its log."""


def check_variant_names(variants: Sequence[str]) -> None:
  """study.variants: distinct names that can serve as directory names."""
  if not variants or len(set(variants)) != len(variants):
    raise ConfigError(f'config field study.variants={tuple(variants)!r} is invalid: expected '
                      'distinct variant names')
  for v in variants:
    if not re.fullmatch(r'[A-Za-z0-9_.-]+', v):
      raise ConfigError(f'config field study.variants has {v!r}: names are directory names '
                        '(letters, digits, _ . -)')


@dataclasses.dataclass(frozen=True)
class Study:
  """The ``study`` section of an extrapolation config."""
  variants: tuple[str, ...]
  overrides: Mapping[str, Any]
  parallel: int = 1
  passkey_mix: float = 0.0
  passkey_mix_format: str = 'compact'
  # data.task values each variant is trained on, one model per (task, variant); () = the config's.
  tasks: tuple[str, ...] = ()
  extend: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # lcr.extend.ExtendSpec

  def __post_init__(self):
    check_variant_names(self.variants)
    from lcr.data import config as data_config   # the data room imports lcr.config: import lazily
    models = {job.name for job in self.jobs()}
    unknown = sorted(set(self.overrides) - set(self.variants) - set(data_config.TASKS) - models)
    if unknown:
      raise ConfigError(f'config field study.overrides names {unknown}, not in study.variants '
                        f'(nor a task of {data_config.TASKS}, nor a model: {sorted(models)})')
    if self.parallel < 1:
      raise ConfigError(f'config field study.parallel={self.parallel} is invalid: must be >= 1')
    if not 0.0 <= self.passkey_mix < 1.0:
      raise ConfigError(f'config field study.passkey_mix={self.passkey_mix} is invalid: must be '
                        'in [0, 1)')
    if self.passkey_mix_format not in passkey.FORMATS:
      raise ConfigError(f'config field study.passkey_mix_format={self.passkey_mix_format!r} is '
                        f'invalid: allowed values are {sorted(passkey.FORMATS)}')
    for task in self.tasks:
      check_choice('study.tasks', task, data_config.TASKS)
    if len(set(self.tasks)) != len(self.tasks):
      raise ConfigError(f'config field study.tasks={self.tasks!r} is invalid: expected distinct tasks')

  def jobs(self) -> list[Job]:
    """One trained model per variant, or per (task, variant) when ``tasks`` are given."""
    return [Job(v, t) for t in self.tasks or (None,) for v in self.variants]


@dataclasses.dataclass(frozen=True)
class Job:
  """One model of the study: a variant, trained on ``task`` (None: the config's data.task)."""
  variant: str
  task: str | None = None

  @property
  def name(self) -> str:
    """The model's directory and worker name: the variant, prefixed by its task if one is set."""
    return self.variant if self.task is None else f'{self.task}-{self.variant}'


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], Study]:
  """(the shared run config as a plain dict, the Study) of an extrapolation ConfigDict."""
  values = config.to_dict() if hasattr(config, 'to_dict') else copy.deepcopy(dict(config))
  study = dict(values.pop('study', {}))
  variants = study.get('variants', ())   # 'rope,alibi' or ('rope', 'alibi')
  variants = variants.split(',') if isinstance(variants, str) else variants
  study['variants'] = tuple(v.strip() for v in variants if v.strip())
  tasks = study.get('tasks', ())
  tasks = tasks.split(',') if isinstance(tasks, str) else tasks
  study['tasks'] = tuple(t.strip() for t in tasks if t.strip())
  study['overrides'] = dict(study.get('overrides') or {})
  study['extend'] = dict(study.get('extend') or {})
  known = {f.name for f in dataclasses.fields(Study)}
  if set(study) - known:
    raise ConfigError(f'config field study.{sorted(set(study) - known)[0]} does not exist; fields '
                      f'of study are: {", ".join(sorted(known))}')
  return values, Study(**study)


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
  out = dict(base)
  for k, v in overrides.items():
    out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
  return out


def passkey_lengths(config: Config) -> tuple[int, ...]:
  if not config.eval.passkey:
    return ()
  return config.eval.passkey_lengths or config.eval.eval_lengths(config.train.seq_len)


def variant_config(values: Mapping[str, Any], study: Study, variant: str,
                   task: str | None = None) -> Config:
  """The run config of one variant: model.pos = the variant's name unless its overrides set it;
  data.task = ``task`` when given. ``study.overrides`` of the task, then of the variant, then of
  the model (``'<task>-<variant>'``, e.g. ``'mqar-xl'``) apply: the most specific wins.

  A learned table is sized to the longest evaluation length; its rows past L get no gradient, and
  ``eval.learned_positions`` (recorded in every row) says whether evaluation clamps positions to
  row L − 1 or reads those untrained rows.
  """
  merged = _merge(copy.deepcopy(dict(values)), {'model': {'pos': variant}})
  if task is not None:
    merged = _merge(_merge(merged, {'data': {'task': task}}), study.overrides.get(task, {}))
  merged = _merge(merged, study.overrides.get(variant, {}))
  if task is not None:
    merged = _merge(merged, study.overrides.get(Job(variant, task).name, {}))
  config = from_config_dict(merged)
  if config.model.pos == 'learned':
    longest = max((config.train.seq_len, *config.eval.eval_lengths(config.train.seq_len),
                   *passkey_lengths(config)))
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, max_len=longest))
  return config


def model_dir(workdir: str, variant: str) -> str:
  return os.path.join(workdir, MODELS_DIR, variant)


def is_trained(directory: str, steps: int) -> bool:
  """Does ``directory`` hold a finished checkpoint of step >= ``steps``?"""
  ckpts = os.path.join(directory, 'checkpoints')
  done = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  return bool(done) and max(done) >= steps and os.path.exists(os.path.join(directory, 'config.json'))


def train_variant(config: Config, study: Study, directory: str) -> None:
  """Trains (or resumes) one variant, with passkey rows mixed in if ``study.passkey_mix`` > 0."""
  from lcr import train as train_lib  # training is only needed when a model is missing
  from lcr.data.tokenizers import get_tokenizer

  data = train_lib.open_data(config)
  if study.passkey_mix:
    tokenizer = get_tokenizer(config.data)
    try:
      passkey.make_example(tokenizer, config.train.seq_len + 1, 0.5, 10_000,
                           study.passkey_mix_format, tokenizer.bos_id)
    except ValueError as err:
      raise ConfigError(f'config field study.passkey_mix={study.passkey_mix} needs passkey '
                        f'examples of train.seq_len + 1 = {config.train.seq_len + 1} tokens: {err}; '
                        "use study.passkey_mix_format='compact', a longer train.seq_len, or "
                        'study.passkey_mix=0') from err
    data.train = passkey.PasskeyMix(data.train, tokenizer, study.passkey_mix,
                                    fmt=study.passkey_mix_format, bos_id=tokenizer.bos_id,
                                    seed=config.seed)
  train_lib.train(train_lib.with_vocab(config, data.vocab_size), directory, data)


@dataclasses.dataclass
class EvalData:
  """The evaluation split as a stream, with what bits per byte and passkey prompts need."""
  stream: evaluate.Stream
  byte_lengths: np.ndarray
  tokenizer: Any

  @classmethod
  def load(cls, config: Config) -> EvalData:
    from lcr.data import pipeline
    from lcr.data.tokenizers import get_tokenizer
    tokenizer = get_tokenizer(config.data)
    split = pipeline.load_eval_tokens(config.data, config.eval.split)
    stream = evaluate.stream_from_offsets(np.asarray(split.tokens, np.int32), split.doc_offsets)
    return cls(stream, tokenizer.byte_lengths(), tokenizer)


def _trained_model(config: Config, directory: str):
  """(params, model config for evaluation): the saved architecture, this config's eval-time fields."""
  from lcr import checkpoint
  params, saved = checkpoint.load_params(directory)
  keep = {f: getattr(saved.model, f) for f in EVAL_TIME_FIELDS + ('vocab_size',)}
  checkpoint.check_compatible(
      saved, dataclasses.replace(config, model=dataclasses.replace(config.model, **keep)), directory)
  now = {f: getattr(config.model, f) for f in EVAL_TIME_FIELDS}
  return params, dataclasses.replace(saved.model, **now)


def evaluate_variant(config: Config, variant: str, workdir: str, data: EvalData | None,
                     directory: str | None = None) -> int:
  """Evaluates one trained variant, appending rows not yet in the workdir; returns rows written.

  A model trained on a retrieval task (data.task) is scored on that task (lcr.retrieval), one
  trained on the corpus on perplexity (and passkey when eval.passkey is set) over ``data``.
  """
  params, model_cfg = _trained_model(config, directory or model_dir(workdir, variant))
  train_len = config.train.seq_len
  evaluator = evaluate.Evaluator(params, model_cfg, config.eval, train_len)
  labels = dict(variant=variant, seed=config.seed)
  if config.data.task != 'lm':
    return retrieval.evaluate_task(config, evaluator, labels, workdir, writer=_writer())
  paths = {name: os.path.join(workdir, name)
           for name in (results.RESULTS, results.PER_POSITION, results.PASSKEY)}
  done = {results.row_key(r) for r in results.read_rows(paths[results.RESULTS])}
  written = 0
  for task in evaluate.plan_tasks(model_cfg, config.eval, train_len):
    fields = {**labels, **evaluator.task_fields(task)}
    if results.row_key(fields) in done:
      continue
    start = time.perf_counter()
    scores = evaluator.perplexity(task, data.stream, data.byte_lengths)
    row = {**fields, **evaluate.score_fields(scores), 'split': config.eval.split}
    per_position = {**{k: row[k] for k in results.KEY_FIELDS}, 'pos': row['pos'],
                    'loss': [round(float(x), 5) for x in scores.position_loss()],
                    'count': scores.position_count.tolist()}
    if _writer():
      results.append_rows(paths[results.PER_POSITION], [per_position])
      results.append_rows(paths[results.RESULTS], [row])
    written += 1
    logging.info('%s %s %s L=%d: ppl %.3f bpb %.3f (%d tokens, %.1f s)', variant, task.rope_scaling,
                 task.protocol, task.eval_len, scores.ppl, scores.bpb, scores.tokens,
                 time.perf_counter() - start)
  return written + _evaluate_passkey(config, variant, evaluator, data, labels, paths[results.PASSKEY])


def _evaluate_passkey(config: Config, variant: str, evaluator: evaluate.Evaluator, data: EvalData,
                      labels: dict, path: str) -> int:
  lengths = passkey_lengths(config)
  if not lengths:
    return 0
  done = {results.row_key(r, results.PASSKEY_KEY_FIELDS) for r in results.read_rows(path)}
  scalings = config.eval.rope_scalings if evaluator.model_cfg.pos == 'rope' else ('none',)
  written = 0
  for mode, scaling, length in itertools.product(config.eval.passkey_modes, scalings, lengths):
    base = {**labels, 'pos': evaluator.model_cfg.pos, 'rope_scaling': scaling,
            'train_len': config.train.seq_len, 'eval_len': length, 'mode': mode}
    keys = {results.row_key({**base, 'depth': float(d)}, results.PASSKEY_KEY_FIELDS)
            for d in config.eval.passkey_depths}
    if keys <= done:
      continue
    records = evaluator.passkey(scaling, length, data.tokenizer, data.tokenizer.bos_id, mode)
    factor = evaluate.effective_factor(evaluator.config(scaling, length))
    rows = [{**base, 'rope_factor': factor, 'format': config.eval.passkey_format, **r}
            for r in records]
    if _writer():
      results.append_rows(path, rows)
    written += len(rows)
    logging.info('%s %s passkey (%s) L=%d: accuracy %s', variant, scaling, mode, length,
                 [round(r['accuracy'], 2) for r in records])
  return written


def run_variant(values: Mapping[str, Any], study: Study, job: Job, workdir: str,
                data: EvalData | None = None) -> None:
  """Trains the job's model if it is missing or unfinished, then evaluates what is missing."""
  config = variant_config(values, study, job.variant, job.task)
  directory = model_dir(workdir, job.name)
  if is_trained(directory, config.train.steps):
    logging.info('%s: reusing the trained model in %s', job.name, directory)
  else:
    start = time.perf_counter()
    train_variant(config, study, directory)
    logging.info('%s: trained in %.1f s', job.name, time.perf_counter() - start)
  if config.data.task == 'lm' and data is None:
    data = EvalData.load(config)
  evaluate_variant(config, job.variant, workdir, data, directory)


def prepare_data(values: Mapping[str, Any], study: Study) -> None:
  """Builds the corpus, tokenizer and token caches once, before worker processes share them."""
  from lcr.data import pipeline
  job = study.jobs()[0]
  config = variant_config(values, study, job.variant, job.task)
  pipeline.prepare_data(config.data, (config.eval.split,))


CORE_ENV = 'LCR_WORKER_CORE'


def pin_worker() -> None:
  """In a worker process: keep this process (and the threads it starts) on the core it was given."""
  core = os.environ.get(CORE_ENV)
  if core is not None:
    os.sched_setaffinity(0, {int(core)})


def _worker(argv: Sequence[str], variant: str, core: int, log_path: str) -> subprocess.Popen:
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + SINGLE_THREAD_XLA_FLAGS).strip()
  cores = sorted(os.sched_getaffinity(0))
  env[CORE_ENV] = str(cores[core % len(cores)])
  with open(log_path, 'a') as log:
    return subprocess.Popen([*argv, f'--only={variant}'], env=env, stdout=log, stderr=log)


def run_parallel(argv: Sequence[str], variants: Sequence[str], workdir: str, parallel: int) -> None:
  """Runs ``argv --only=<variant>`` for each variant, ``parallel`` at a time, one core each."""
  os.makedirs(os.path.join(workdir, LOGS_DIR), exist_ok=True)
  queue, running, failed = list(variants), {}, []
  free = list(range(parallel))
  while queue or running:
    while queue and free:
      variant, core = queue.pop(0), free.pop(0)
      log_path = os.path.join(workdir, LOGS_DIR, f'{variant}.log')
      running[variant] = (_worker(argv, variant, core, log_path), core, log_path)
      logging.info('%s: started on core %d, log %s', variant, core, log_path)
    time.sleep(0.5)
    for variant, (proc, core, log_path) in list(running.items()):
      if proc.poll() is not None:
        del running[variant]
        free.append(core)
        if proc.returncode:
          failed.append((variant, log_path))
          with open(log_path) as f:
            sys.stderr.write(f'--- {variant} failed (exit {proc.returncode}); end of {log_path}:\n'
                             + ''.join(f.readlines()[-30:]))
        else:
          logging.info('%s: done', variant)
  if failed:
    raise StudyError(f'variants {[v for v, _ in failed]} failed; see {[p for _, p in failed]}; '
                     'fix the cause and run the same command again to resume')


def _longest_first(values: Mapping[str, Any], study: Study) -> list[str]:
  """Job names by decreasing number of evaluations (RoPE, with its scalings, first), then in the
  order of study.variants with every task of a variant together, so the longest jobs (those the
  preset lists first) do not start last and leave a core idle."""
  def cost(job):
    config = variant_config(values, study, job.variant, job.task)
    evaluations = len(evaluate.plan_tasks(config.model, config.eval, config.train.seq_len))
    return -evaluations, study.variants.index(job.variant)
  return [job.name for job in sorted(study.jobs(), key=cost)]


def _run_in_process(values: Mapping[str, Any], study: Study, workdir: str) -> None:
  loaded: dict[tuple, EvalData] = {}
  for job in study.jobs():
    config = variant_config(values, study, job.variant, job.task)
    key = (config.data, config.eval.split)
    if config.data.task == 'lm' and key not in loaded:
      loaded[key] = EvalData.load(config)
    run_variant(values, study, job, workdir, loaded.get(key))


def run_study(config: Mapping[str, Any], workdir: str, *, worker_argv: Sequence[str] | None = None,
              only: str | None = None, plots_only: bool = False) -> dict[str, str]:
  """The whole study (or one job with ``only``); returns the files drawn from the results.

  Phases: train and evaluate every job (a variant, or a (task, variant) pair), then the extension
  fine-tunes of ``study.extend`` (lcr.extend). ``worker_argv`` is the command that re-runs this
  study; with ``study.parallel`` > 1 each job runs as ``worker_argv --only=<name>`` in its own
  single-threaded process pinned to one core.
  """
  from lcr import extend   # the extension phase
  values, study = split_config(config)
  runs = extend.plan(values, study, workdir)
  os.makedirs(workdir, exist_ok=True)
  if only is not None:
    jobs = {job.name: job for job in study.jobs()}
    if only not in jobs and only not in runs:
      raise ConfigError(f'--only={only!r} is not a job of this study: {sorted(jobs) + sorted(runs)}')
    pin_worker()
    if only in jobs:
      run_variant(values, study, jobs[only], workdir)
    else:
      extend.run(runs[only], workdir, writer=_writer())
    return {}
  if not plots_only:
    if _writer():
      _write_study_file(workdir, config)
    start = time.perf_counter()
    parallel = study.parallel > 1 and worker_argv is not None
    if parallel and len(study.jobs()) > 1:
      prepare_data(values, study)
      run_parallel(worker_argv, _longest_first(values, study), workdir, study.parallel)
    else:
      _run_in_process(values, study, workdir)
    if parallel and len(runs) > 1:
      run_parallel(worker_argv, list(runs), workdir, study.parallel)
    else:
      for run in runs.values():
        extend.run(run, workdir, writer=_writer())
    logging.info('study finished in %.1f s', time.perf_counter() - start)
  return plots.draw_all([workdir], workdir) if _writer() else {}


def _writer() -> bool:
  """Only process 0 of a multi-host run writes result files (every process evaluates)."""
  import jax
  return jax.process_index() == 0


def _write_study_file(workdir: str, config: Mapping[str, Any]) -> None:
  values = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  path = os.path.join(workdir, STUDY_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(values, f, indent=2, default=list)
  os.replace(path + '.tmp', path)
