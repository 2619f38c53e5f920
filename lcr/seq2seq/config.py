"""The ``seq2seq`` config section: the generated task, the training tips and RL fine-tuning.

Everything here is validated when the section is built, before anything compiles; every invalid value
raises one ConfigError naming the field. Checks that need other sections too (a tip that needs the
encoder-decoder, a test length a learned position table cannot serve) are in :func:`check_run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lcr.config import ConfigError, check_choice, check_positive, check_range, fail, from_mapping

# The registries live in lcr.seq2seq.tasks / .tips / .attention; tests check that these agree.
TASKS = ('copy', 'reverse', 'sort', 'addition', 'rewrite')
TRAININGS = ('teacher_forcing', 'scheduled_sampling', 'two_pass', 'parallel')
DECAYS = ('linear', 'exponential', 'inverse_sigmoid')
MIXES = ('argmax', 'sample', 'softmax')
CROSS_ATTENTIONS = ('softmax', 'location', 'monotonic')
MONOTONIC_DECODES = ('hard', 'expected')
EVAL_DECODES = ('greedy', 'beam', 'sample')
LETTERS = 26


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """A generated task, split by length: train on lengths min_len … train_len (N), test at N·m."""
  name: str = 'copy'                 # copy | reverse | sort | addition | rewrite
  symbols: int = 10                  # letters a, b, … the letter tasks draw from (2 … 26)
  min_len: int = 1
  train_len: int = 8                 # N: the longest training length
  test_multipliers: tuple[int, ...] = (1, 2, 4, 8)
  test_examples: int = 200           # examples per test length
  holdout: int = 10                  # 1 in `holdout` sources of a test length ≤ N is test-only
  seed: int = 0                      # examples are a function of (seed, split, length, index)
  pack: int = 4                      # training rows hold `pack` longest examples' worth of tokens

  def __post_init__(self):
    check_choice('seq2seq.task.name', self.name, TASKS)
    check_range('seq2seq.task.symbols', self.symbols, 2, LETTERS)
    check_positive('seq2seq.task.min_len', self.min_len)
    if self.train_len < self.min_len:
      fail('seq2seq.task.train_len', self.train_len, f'must be >= seq2seq.task.min_len={self.min_len}')
    if not self.test_multipliers:
      fail('seq2seq.task.test_multipliers', self.test_multipliers, 'name at least one multiplier')
    for m in self.test_multipliers:
      check_positive('seq2seq.task.test_multipliers', m)
    for name in ('test_examples', 'pack'):
      check_positive(f'seq2seq.task.{name}', getattr(self, name))
    if self.holdout < 2:
      fail('seq2seq.task.holdout', self.holdout, 'must be >= 2 (1 in holdout sources is test-only)')
    if self.seed < 0:
      fail('seq2seq.task.seed', self.seed, 'must be >= 0')

  @property
  def test_lengths(self) -> tuple[int, ...]:
    return tuple(sorted({self.train_len * m for m in self.test_multipliers}))


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Self-critical REINFORCE on sentence BLEU (Rennie et al. 2017), optionally MIXER's schedule."""
  steps: int = 0                     # 0: no RL fine-tuning
  init: str = ''                     # the teacher-forced model: a workdir (the study: a variant)
  lr: float = 1e-4
  batch_size: int = 32
  temperature: float = 1.0           # of the sampled sequence w^s
  # MIXER (Ranzato et al. 2016 §3.3): the first max(|y| − Δ, 0) tokens of each target are trained
  # by cross-entropy and the model samples the rest; Δ starts at mixer_delta and grows by it every
  # mixer_every steps, until REINFORCE covers whole sequences.
  mixer: bool = False
  mixer_delta: int = 2
  mixer_every: int = 50

  def __post_init__(self):
    if self.steps < 0:
      fail('seq2seq.rl.steps', self.steps, 'must be >= 0 (0 = no RL fine-tuning)')
    for name in ('lr', 'batch_size', 'temperature', 'mixer_delta', 'mixer_every'):
      check_positive(f'seq2seq.rl.{name}', getattr(self, name))
    if self.steps and not self.init:
      fail('seq2seq.rl.init', self.init, 'RL fine-tunes a teacher-forced model: name its workdir')


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """The task and the training tips (see docs/seq2seq.md for each paper and formula)."""
  task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
  rl: RLConfig = dataclasses.field(default_factory=RLConfig)
  # Exposure bias: teacher_forcing | scheduled_sampling (Bengio et al. 2015, step by step) |
  # two_pass (Mihaylova & Martins 2019) | parallel (Duckworth et al. 2019, ss_passes passes).
  training: str = 'teacher_forcing'
  # ε_i, the probability of feeding the gold token at step i (Bengio et al. 2015 §2.4): linear
  # max(ss_min, ss_k − ss_c·i) (capped at 1), exponential ss_k^i, inverse_sigmoid ss_k/(ss_k + e^(i/ss_k)).
  ss_decay: str = 'inverse_sigmoid'
  ss_k: float = 100.0
  ss_c: float = 1e-3
  ss_min: float = 0.0
  ss_mix: str = 'sample'             # the model's input: argmax | sample | softmax (not step by step)
  ss_passes: int = 2                 # parallel: passes, the gradient through the last only
  # Copying: the pointer-generator (See et al. 2017) and its coverage loss weight λ (0 = off).
  pointer: bool = False
  coverage_weight: float = 0.0
  # Cross-attention: softmax (Vaswani et al. 2017) | location (Chorowski et al. 2015) |
  # monotonic (Raffel et al. 2017; expected alignments in training, hard when decoding).
  cross_attention: str = 'softmax'
  attention_dim: int = 0             # location/monotonic: additive energy width (0 = head dim)
  location_filters: int = 8          # location: conv filters k over the previous alignment
  location_width: int = 9            # location: conv width r (odd, centred)
  monotonic_noise: float = 1.0       # monotonic: std of pre-sigmoid noise in training (§2.5)
  # monotonic: the initial r and g of eq. 16, e = g vᵀ tanh(…)/‖v‖ + r, which starts within
  # r ± g‖v/‖v‖‖₁ (≤ r ± g√A): r = −4 as Raffel et al. 2017 initialise it; g large enough that
  # both hard decisions (p near 0 and near 1) are in reach from the start. With g = 1/√A (e within
  # r ± 1) the quick preset's p stayed between 0.1 and 0.9 and hard decoding failed (docs/seq2seq.md).
  monotonic_bias: float = -4.0
  monotonic_gain: float = 4.0
  # monotonic: the alignments of decoding: 'hard' (Algorithm 1: online, linear time, the paper's
  # test-time process) or 'expected' (eq. 9, as in training: a diagnostic of the gap between the two).
  monotonic_decode: str = 'hard'
  # Guided attention loss (Tachibana et al. 2017 §4.1) on every cross-attention map: weight λ
  # (0 = off) and the width g of W_nt = 1 − exp(−(n/N − t/T)² / 2g²).
  guided_weight: float = 0.0
  guided_g: float = 0.2
  eval_decodes: tuple[str, ...] = ('greedy',)   # greedy | beam | sample (knobs: decode.*)
  eval_batch: int = 100              # test examples decoded per call

  def __post_init__(self):
    check_choice('seq2seq.training', self.training, TRAININGS)
    check_choice('seq2seq.ss_decay', self.ss_decay, DECAYS)
    check_choice('seq2seq.ss_mix', self.ss_mix, MIXES)
    check_choice('seq2seq.cross_attention', self.cross_attention, CROSS_ATTENTIONS)
    check_choice('seq2seq.monotonic_decode', self.monotonic_decode, MONOTONIC_DECODES)
    self._check_schedule()
    if self.ss_mix == 'softmax' and self.training == 'scheduled_sampling':
      fail('seq2seq.ss_mix', self.ss_mix, "scheduled_sampling feeds tokens step by step: use "
           "'argmax' or 'sample' (the softmax-weighted embedding mixes two_pass/parallel inputs)")
    if self.ss_passes < 2:
      fail('seq2seq.ss_passes', self.ss_passes, 'parallel scheduled sampling needs >= 2 passes')
    for name in ('coverage_weight', 'guided_weight', 'monotonic_noise', 'attention_dim'):
      if getattr(self, name) < 0:
        fail(f'seq2seq.{name}', getattr(self, name), 'must be >= 0')
    if self.coverage_weight and not self.pointer:
      fail('seq2seq.coverage_weight', self.coverage_weight,
           'the coverage loss is on the copy attention: needs seq2seq.pointer=True')
    check_positive('seq2seq.guided_g', self.guided_g)
    check_positive('seq2seq.monotonic_gain', self.monotonic_gain)
    check_positive('seq2seq.location_filters', self.location_filters)
    if self.location_width < 1 or self.location_width % 2 == 0:
      fail('seq2seq.location_width', self.location_width, 'must be odd and >= 1 (a centred conv)')
    if not self.eval_decodes:
      fail('seq2seq.eval_decodes', self.eval_decodes, f'name at least one of {EVAL_DECODES}')
    for name in self.eval_decodes:
      check_choice('seq2seq.eval_decodes', name, EVAL_DECODES)
    check_positive('seq2seq.eval_batch', self.eval_batch)

  def _check_schedule(self):
    if self.ss_decay == 'exponential' and not 0 < self.ss_k < 1:
      fail('seq2seq.ss_k', self.ss_k, 'exponential decay ε = k^i needs 0 < k < 1')
    if self.ss_decay == 'inverse_sigmoid' and self.ss_k < 1:
      fail('seq2seq.ss_k', self.ss_k, 'inverse sigmoid decay ε = k/(k + exp(i/k)) needs k >= 1')
    if self.ss_decay == 'linear':
      check_positive('seq2seq.ss_k', self.ss_k)
      check_positive('seq2seq.ss_c', self.ss_c)
    check_range('seq2seq.ss_min', self.ss_min, 0.0, 1.0)

  @property
  def needs_attention_maps(self) -> bool:
    return self.pointer or self.guided_weight > 0


def seq2seq_config(values: Mapping[str, Any] | None) -> Seq2SeqConfig:
  """``Seq2SeqConfig`` from the ``seq2seq`` part of a ConfigDict (with its task and rl parts)."""
  values = dict(values or {})
  task = from_mapping(TaskConfig, values.pop('task', None), 'seq2seq.task')
  rl = from_mapping(RLConfig, values.pop('rl', None), 'seq2seq.rl')
  return dataclasses.replace(from_mapping(Seq2SeqConfig, values, 'seq2seq'), task=task, rl=rl)


# Tips that act on cross-attention, or run the encoder-decoder's decoder on embedding mixtures.
ENCODER_DECODER_ONLY = (
    ('seq2seq.pointer', lambda s: s.pointer),
    ('seq2seq.guided_weight', lambda s: s.guided_weight > 0),
    ('seq2seq.cross_attention', lambda s: s.cross_attention != 'softmax'),
    ('seq2seq.training', lambda s: s.training != 'teacher_forcing'),
)


def check_run(config) -> None:
  """Checks across sections, before compiling: fails with one ConfigError naming the field."""
  from lcr.seq2seq import tasks   # the task registry knows each task's lengths
  s, model = config.seq2seq, config.model
  if model.arch != 'encoder_decoder':
    for field, used in ENCODER_DECODER_ONLY:
      if used(s):
        value = getattr(s, field.split('.')[-1])
        fail(field, value, f"needs model.arch='encoder_decoder' (model.arch={model.arch!r})")
  if model.ffn == 'moe':
    fail('model.ffn', model.ffn, 'the seq2seq trainers do not collect the MoE balance and z '
         'losses; use a dense FFN (mlp, swiglu or geglu)')
  if model.arch == 'encoder_decoder' and model.norm_placement == 'deepnorm':
    fail('model.norm_placement', model.norm_placement, "lcr's DeepNorm constants are DeepNet's "
         "decoder-only column (Wang et al. 2022, Table 1); the encoder-decoder takes 'pre' or 'post'")
  if model.arch == 'encoder_decoder' and model.pos_combine != 'add':
    fail('model.pos_combine', model.pos_combine, "the encoder-decoder adds absolute positions ('add')")
  if s.training == 'scheduled_sampling' and (s.guided_weight or s.coverage_weight):
    fail('seq2seq.training', s.training, 'scheduled_sampling decodes step by step and takes no '
         'attention-map loss: set seq2seq.guided_weight=0 and seq2seq.coverage_weight=0')
  if model.pos == 'learned':
    longest = max(tasks.row_positions(config, n) for n in s.task.test_lengths)
    if longest > model.max_len:
      raise ConfigError(
          f'config field seq2seq.task.test_multipliers={s.task.test_multipliers} is invalid: the '
          f'longest test length {max(s.task.test_lengths)} needs {longest} positions, past the '
          f'learned table of model.max_len={model.max_len}; raise model.max_len or test shorter')
