"""The study's ``extend`` phase: fine-tune trained variants at a longer length, then evaluate them.

Context extension as practised: change the positions, then fine-tune briefly at the new length
(position interpolation, Chen et al. 2023; NTK; YaRN, Peng et al. 2023), with every parameter or
parameter-efficiently (LoRA; LongLoRA, Chen et al. 2024). ``study.extend`` lists the runs as a
product: every variant in ``variants`` × RoPE scaling in ``scalings`` × method in ``methods``,
fine-tuned for ``steps`` steps at ``factor`` × L with that scaling's factor set to ``factor``
(scaling 'none' fine-tunes at the new length without changing the positions). Each run starts from
the variant's trained parameters (``train.init_from``), trains in
``models/extend/<variant>.<scaling>.<method>.L<length>.s<steps>`` and is evaluated at the
variant's evaluation lengths with its own (fixed) scaling; LoRA is merged for evaluation and
LongLoRA's S²-Attn is evaluated with full attention. Rows go to ``extension.jsonl``:

  variant, pos, seed, train_len (the variant's L), rope_scaling, rope_factor, finetune_method,
  finetune_steps, finetune_len, protocol, stride, eval_len, loss, ppl, bpb, tokens, bytes, split,
  trainable_params, total_params

The evaluation-time-only curves they are compared with are the variant's own rows in
results.jsonl. Finished runs and rows are reused, so the phase resumes like the rest of the study.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from lcr import checkpoint, evaluate, peft, results
from lcr.config import (ROPE_SCALINGS, Config, ConfigError, check_choice, from_config_dict,
                        from_mapping, to_dict)

EXTEND_DIR = 'extend'
EMBED_AND_NORMS = 'token_embedding|norm'   # LongLoRA §3.3: embeddings and normalisation layers


def _lora_embed_norm(length: int) -> dict:
  del length
  return {'peft': {'method': 'lora', 'trainable_extra': EMBED_AND_NORMS}}


# Fine-tuning methods: the config each adds, given the fine-tuning length.
METHODS: dict[str, Callable[[int], dict]] = {
    'full': lambda length: {},
    'lora': lambda length: {'peft': {'method': 'lora'}},
    'lora_embed_norm': _lora_embed_norm,
    # LongLoRA: LoRA + trainable embeddings and norms + S²-Attn in groups of a quarter of the
    # length (Chen et al. 2024 §3.2–3.3); evaluation uses full attention.
    'longlora': lambda length: {**_lora_embed_norm(length), 'model': {
        'attention': 'shifted_sparse', 'attention_block': length // 4}},
    'adapter': lambda length: {'peft': {'method': 'adapter'}},
}


@dataclasses.dataclass(frozen=True)
class ExtendSpec:
  """``study.extend``: which fine-tunes the phase runs (none while ``variants`` is empty)."""
  variants: tuple[str, ...] = ()
  scalings: tuple[str, ...] = ('linear', 'ntk', 'yarn')
  methods: tuple[str, ...] = ('full', 'lora', 'lora_embed_norm')
  factor: int = 4
  steps: int = 200
  eval_every: int = 0          # also evaluate the checkpoints every this many steps (0: last only)
  # {section: {field: value}} on top of every fine-tune's config, e.g. {'train': {'lr': 1e-3}}.
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name in ('variants', 'scalings', 'methods'):
      value = getattr(self, name)
      value = value.split(',') if isinstance(value, str) else value
      object.__setattr__(self, name, tuple(v.strip() for v in value if v.strip()))
    for scaling in self.scalings:
      check_choice('study.extend.scalings', scaling, set(ROPE_SCALINGS) - {'dynamic_ntk'})
    for method in self.methods:
      check_choice('study.extend.methods', method, METHODS)
    if self.factor < 2:
      raise ConfigError(f'config field study.extend.factor={self.factor} is invalid: the new '
                        'length is factor × train.seq_len, so factor must be >= 2')
    if self.steps < 1:
      raise ConfigError(f'config field study.extend.steps={self.steps} is invalid: must be > 0')
    if not 0 <= self.eval_every <= self.steps:
      raise ConfigError(f'config field study.extend.eval_every={self.eval_every} is invalid: must '
                        f'be in [0, study.extend.steps={self.steps}]')

  @property
  def eval_steps(self) -> tuple[int, ...]:
    """The fine-tuning steps whose checkpoints are evaluated."""
    every = tuple(range(self.eval_every, self.steps, self.eval_every)) if self.eval_every else ()
    return every + (self.steps,)


@dataclasses.dataclass(frozen=True)
class Run:
  """One fine-tune of the phase and where its rows come from."""
  name: str
  variant: str
  scaling: str
  method: str
  config: Config
  base_dir: str
  train_len: int                   # the variant's training length L
  eval_lengths: tuple[int, ...]    # the variant's evaluation lengths
  eval_steps: tuple[int, ...]      # the checkpoints evaluated

  @property
  def directory(self) -> str:
    return os.path.join(os.path.dirname(self.base_dir), EXTEND_DIR, self.name)


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
  out = dict(base)
  for k, v in overrides.items():
    out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
  return out


def run_config(base: Config, base_dir: str, spec: ExtendSpec, scaling: str, method: str) -> Config:
  """The fine-tune's config: the variant's, at factor × L, from its parameters, with the method."""
  length = spec.factor * base.train.seq_len
  scaled = scaling != 'none'
  values = _merge(copy.deepcopy(to_dict(base)), {
      'train': {'seq_len': length, 'steps': spec.steps, 'init_from': os.path.abspath(base_dir),
                'init_extend_positions': True, 'checkpoint_every': spec.eval_every,
                'keep_checkpoints': len(spec.eval_steps)},
      'model': {'rope_scaling': scaling, 'rope_factor': float(spec.factor) if scaled else 1.0,
                'rope_original_length': base.train.seq_len if scaled else 0},
      'eval': {'passkey': False}})
  values = _merge(_merge(values, METHODS[method](length)), spec.overrides)
  return from_config_dict(values)


def plan(values: Mapping[str, Any], study: Any, workdir: str) -> dict[str, Run]:
  """{run name: Run} of ``study.extend`` ({} without it)."""
  from lcr import study as study_lib
  spec = from_mapping(ExtendSpec, study.extend, 'study.extend')
  jobs = {job.name: job for job in study.jobs()}
  runs = {}
  for variant in spec.variants:
    if variant not in jobs:
      raise ConfigError(f'config field study.extend.variants names {variant!r}, not a trained '
                        f'model of this study: {sorted(jobs)}')
    job = jobs[variant]
    base = study_lib.variant_config(values, study, job.variant, job.task)
    if base.data.task != 'lm':
      raise ConfigError(f'config field study.extend.variants names {variant!r}, trained on '
                        f'data.task={base.data.task!r}: the extension phase fine-tunes language models')
    base_dir = study_lib.model_dir(workdir, job.name)
    lengths = base.eval.eval_lengths(base.train.seq_len)
    for scaling in spec.scalings:
      for method in spec.methods:
        config = run_config(base, base_dir, spec, scaling, method)
        name = f'{variant}.{scaling}.{method}.L{config.train.seq_len}.s{spec.steps}'
        runs[name] = Run(name, job.variant, scaling, method, config, base_dir,
                         base.train.seq_len, lengths, spec.eval_steps)
  return runs


def run(run_: Run, workdir: str, *, writer: bool = True) -> int:
  """Fine-tunes ``run_`` unless it is finished, then evaluates what is missing; rows written."""
  from lcr import study as study_lib, train as train_lib
  if not study_lib.is_trained(run_.base_dir, 1):
    raise ConfigError(f'study.extend: {run_.variant!r} has no trained model in {run_.base_dir}; '
                      'run the whole study (its first phase trains it)')
  if study_lib.is_trained(run_.directory, run_.config.train.steps):
    logging.info('%s: reusing the fine-tuned model', run_.name)
  else:
    start = time.perf_counter()
    data = train_lib.open_data(run_.config)
    train_lib.train(train_lib.with_vocab(run_.config, data.vocab_size), run_.directory, data)
    logging.info('%s: fine-tuned in %.1f s', run_.name, time.perf_counter() - start)
  return evaluate_run(run_, workdir, writer=writer)


def _labels(run_: Run, step: int) -> dict[str, Any]:
  c = run_.config
  return dict(variant=run_.variant, pos=c.model.pos, seed=c.seed, train_len=run_.train_len,
              rope_scaling=run_.scaling, rope_factor=evaluate.effective_factor(c.model),
              finetune_method=run_.method, finetune_steps=step, finetune_len=c.train.seq_len)


def evaluate_run(run_: Run, workdir: str, *, writer: bool = True) -> int:
  """Perplexity of the fine-tuned checkpoints at the variant's lengths, into extension.jsonl."""
  from lcr import study as study_lib
  path = os.path.join(workdir, results.EXTENSION)
  done = {results.row_key(r, results.EXTENSION_KEY_FIELDS) for r in results.read_rows(path)}
  eval_cfg = dataclasses.replace(run_.config.eval, lengths=run_.eval_lengths, rope_scalings=('none',))
  length, data, written = run_.config.train.seq_len, None, 0
  for step in run_.eval_steps:
    labels = _labels(run_, step)
    tasks = [t for t in evaluate.plan_tasks(run_.config.model, eval_cfg, length)
             if results.row_key({**labels, 'protocol': t.protocol, 'stride': t.stride,
                                 'eval_len': t.eval_len}, results.EXTENSION_KEY_FIELDS) not in done]
    if not tasks:
      continue
    params, saved = checkpoint.load_params(run_.directory, step)
    trainable, total = peft.count(saved.peft, params)
    params, model_fn = peft.for_evaluation(params, saved.peft)
    evaluator = evaluate.Evaluator(params, saved.model, eval_cfg, length, model_fn)
    data = data or study_lib.EvalData.load(run_.config)
    for task in tasks:
      scores = evaluator.perplexity(task, data.stream, data.byte_lengths)
      row = {**labels, 'protocol': task.protocol, 'stride': task.stride, 'eval_len': task.eval_len,
             **evaluate.score_fields(scores), 'split': eval_cfg.split,
             'trainable_params': trainable, 'total_params': total}
      if writer:
        results.append_rows(path, [row])
      logging.info('%s step %d L=%d: ppl %.3f', run_.name, step, task.eval_len, scores.ppl)
    written += len(tasks)
  return written
