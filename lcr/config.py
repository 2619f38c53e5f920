"""Frozen, typed configuration dataclasses, built once from an ml_collections ConfigDict.

Experiment files (``configs/*.py``) speak ConfigDict; the library speaks the frozen dataclasses defined
here (and in ``lcr/data/config.py`` for the data room). Every field is validated when its dataclass is
built, before anything compiles, and every invalid value raises one :class:`ConfigError` that names the
field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """An invalid configuration value: the message names the field, the value and what is allowed."""


def fail(field: str, value: Any, allowed: str) -> typing.NoReturn:
  raise ConfigError(f'config field {field}={value!r} is invalid: {allowed}')


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
  choices = sorted(choices)
  if value not in choices:
    fail(field, value, f'allowed values are {", ".join(map(repr, choices))}')


def check_positive(field: str, value: float) -> None:
  if not value > 0:
    fail(field, value, 'must be > 0')


def check_range(field: str, value: float, lo: float, hi: float) -> None:
  if not lo <= value <= hi:
    fail(field, value, f'must be in [{lo}, {hi}]')


def _coerce(field: str, value: Any, annotation: Any) -> Any:
  """Converts ConfigDict values (lists, FieldReferences) into what the dataclass field expects."""
  if isinstance(value, ml_collections.FieldReference):
    value = value.get()
  origin = typing.get_origin(annotation)
  if origin is tuple and isinstance(value, (list, tuple)):
    return tuple(value)
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if annotation is int and isinstance(value, float) and value.is_integer():
    return int(value)
  if annotation in (int, float, str, bool) and not isinstance(value, annotation):
    fail(field, value, f'expected a value of type {annotation.__name__}')
  if dataclasses.is_dataclass(annotation) and isinstance(value, (Mapping, ml_collections.ConfigDict)):
    return from_mapping(annotation, value, field)   # a nested section, e.g. model.moe
  return value


def from_mapping(cls: type, values: Mapping[str, Any] | None, prefix: str):
  """Builds the frozen dataclass ``cls`` from a mapping; unknown keys are an error, not ignored."""
  values = dict(values or {})
  hints = typing.get_type_hints(cls)
  known = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(
        f'config field {prefix}.{unknown[0]} does not exist; fields of {prefix} are: '
        f'{", ".join(sorted(known))}')
  kwargs = {k: _coerce(f'{prefix}.{k}', v, hints[k]) for k, v in values.items()}
  return cls(**kwargs)


def to_dict(dc: Any) -> dict[str, Any]:
  """A JSON-friendly dict of a (possibly nested) config dataclass."""
  return dataclasses.asdict(dc)


# Names the model accepts. The registries that implement them live in their own rooms
# (lcr.positional, lcr.layers, lcr.attention); these tuples let the config validate without
# importing JAX code, and tests check that the two agree.
POSITIONAL_ENCODINGS = ('none', 'learned', 'sinusoidal', 'rope', 'xpos', 'alibi', 't5')
ROTARY_ENCODINGS = ('rope', 'xpos')
ROPE_SCALINGS = ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn')
POS_COMBINES = ('add', 'concat')
NORMS = ('layernorm', 'rmsnorm')
NORM_PLACEMENTS = ('pre', 'post', 'deepnorm')
DENSE_FFNS = ('mlp', 'swiglu', 'geglu')
FFNS = DENSE_FFNS + ('moe',)
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_BACKENDS = ('auto', 'xla', 'chunked', 'cpu_flash', 'cudnn', 'splash')
ATTENTION_VARIANTS = ('causal', 'sliding', 'longformer', 'bigbird', 'sinks', 'blockwise',
                      'grouped', 'shifted_sparse')
# Patterns used only while training; evaluation runs them as 'causal' (LongLoRA's S²-Attn, §3.2).
TRAINING_ONLY_ATTENTION = ('shifted_sparse',)
# How attention runs when the mesh shards the sequence (lcr.attention.context_parallel).
CONTEXT_PARALLEL = ('none', 'ring', 'all_gather')
# decoder: the decoder-only LM (lcr.model); encoder_decoder: Vaswani et al. 2017's encoder-decoder
# (lcr.seq2seq.model), trained by experiments/length_generalization.py.
ARCHS = ('decoder', 'encoder_decoder')
MIXERS = ('attention', 'linear', 'retention', 'ssm')      # lcr.mixers (names only here)
MEMORIES = ('none', 'xl', 'infini')
MEMORY_UPDATES = ('linear', 'delta')


DROPLESS = (0.0, -1.0)   # moe.capacity_factor values that mean "no capacity limit"


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts feed-forward layers (``model.ffn='moe'``; docs/moe_and_deepnorm.md)."""
  num_experts: int = 8
  top_k: int = 2                   # experts per token: 1 = Switch, 2 = GShard / Mixtral
  # Slots per expert and sequence: ceil(k·T/E · capacity_factor), at most T; 0 or -1 = dropless.
  capacity_factor: float = 1.25
  every: int = 1                   # layers i with (i + 1) % every == 0 are MoE, the rest dense
  renormalize: bool = True         # gates of the top k divided by their sum (Mixtral); False: Switch
  jitter: float = 0.0              # router input × U(1 − jitter, 1 + jitter) in training (Switch)
  expert_ffn: str = 'mlp'          # each expert (and every dense layer of the model): mlp | swiglu | geglu
  balance_coef: float = 1e-2       # load-balance loss weight (Switch eq. 4, α = 1e-2)
  z_coef: float = 1e-3             # router z-loss weight (ST-MoE eq. 5, c_z = 1e-3)

  def __post_init__(self):
    check_positive('model.moe.num_experts', self.num_experts)
    check_positive('model.moe.every', self.every)
    if not 1 <= self.top_k <= self.num_experts:
      fail('model.moe.top_k', self.top_k,
           f'must be in [1, model.moe.num_experts={self.num_experts}]')
    if self.capacity_factor < 0 and self.capacity_factor not in DROPLESS:
      fail('model.moe.capacity_factor', self.capacity_factor,
           'must be > 0 (slots per expert relative to an even split), or 0 or -1 for dropless '
           'routing')
    if self.top_k == 1 and self.renormalize:
      fail('model.moe.renormalize', self.renormalize,
           'with model.moe.top_k=1 the renormalised gate is always 1 and the router gets no '
           'gradient from the loss; set it to False (Switch Transformer)')
    if not 0.0 <= self.jitter < 1.0:
      fail('model.moe.jitter', self.jitter, 'must be in [0, 1)')
    check_choice('model.moe.expert_ffn', self.expert_ffn, DENSE_FFNS)
    for name in ('balance_coef', 'z_coef'):
      if getattr(self, name) < 0:
        fail(f'model.moe.{name}', getattr(self, name), 'must be >= 0')

  @property
  def dropless(self) -> bool:
    return self.capacity_factor <= 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder-only Transformer LM (field docs in README's model-options table)."""
  vocab_size: int = 259
  arch: str = 'decoder'            # 'decoder' | 'encoder_decoder' (num_layers each side)
  share_embeddings: bool = True    # encoder_decoder: one token embedding for source and target
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 0            # 0 = num_heads (MHA); 1 = MQA; otherwise GQA groups.
  ffn_dim: int = 0                 # 0 = 4 * d_model.
  pos: str = 'rope'
  pos_combine: str = 'add'         # absolute encodings only: add to or concatenate with the embedding.
  pos_dim: int = 0                 # concat only: width of the positional part (0 = d_model // 4).
  max_len: int = 2048              # size of the learned absolute table.
  rope_base: float = 10000.0
  rope_fraction: float = 1.0       # fraction of each head's dims that rotate (GPT-NeoX partial RoPE).
  rope_scaling: str = 'none'
  rope_factor: float = 1.0
  rope_original_length: int = 0    # training length the scaling extends from (0 = no scaling).
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  xpos_gamma: float = 0.4
  xpos_scale_base: float = 512.0
  t5_num_buckets: int = 32
  t5_max_distance: int = 128
  attention_backend: str = 'auto'  # lcr.attention backends; auto picks per platform and call.
  attention: str = 'causal'        # which keys a query sees (lcr.attention.masks).
  window: int = 0                  # sliding/longformer/sinks: tokens a query looks back (> 0).
  global_tokens: int = 0           # longformer/bigbird: first tokens of each document, global.
  sink_tokens: int = 4             # sinks: first tokens of each document, always visible.
  attention_block: int = 0         # bigbird/blockwise block; grouped/shifted_sparse group (tokens).
  bigbird_random_blocks: int = 3   # bigbird: random key blocks per query block.
  bigbird_seed: int = 0            # bigbird: seed of the fixed random pattern.
  attention_chunk: int = 512       # chunked backend: queries and keys per tile.
  length_scaled_logits: bool = False  # q·k × max(1, log(p + 1) / log(length_scale_base)).
  length_scale_base: int = 0       # the training length for length_scaled_logits (> 1).
  context_parallel: str = 'none'   # 'ring' | 'all_gather' when the mesh shards 'length'.
  norm: str = 'layernorm'
  norm_placement: str = 'pre'
  ffn: str = 'mlp'
  moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)   # ffn='moe' only
  dropout: float = 0.0
  tie_embeddings: bool = True
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: bool = False
  scan_layers: bool = False
  # Token mixers other than softmax attention, and attention with memory (lcr/mixers,
  # docs/memory_and_mixers.md; checked by lcr.mixers.checks).
  mixer: str = 'attention'         # attention | linear | retention | ssm
  mixer_chunk: int = 0             # linear/retention: tokens per chunk (0 = one chunk: parallel form)
  memory: str = 'none'             # attention only: none | xl (Transformer-XL) | infini
  memory_length: int = 0           # xl: hidden states before its segment that a token also sees (M)
  segment_length: int = 0          # xl/infini: tokens per segment (S); memory advances per segment
  memory_update: str = 'linear'    # infini: the 'linear' or 'delta' memory update
  ssm_state: int = 16              # ssm: state size N per channel (Mamba: 16)
  ssm_conv: int = 4                # ssm: width of the causal depthwise convolution (Mamba: 4)
  ssm_expand: int = 2              # ssm: inner width = ssm_expand * d_model (Mamba: 2)
  ssm_dt_rank: int = 0             # ssm: rank of the projection to Δ (0 = ceil(d_model / 16), Mamba)

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'max_len', 't5_num_buckets',
                 't5_max_distance'):
      check_positive(f'model.{name}', getattr(self, name))
    for name in ('num_kv_heads', 'ffn_dim', 'pos_dim', 'rope_original_length'):
      if getattr(self, name) < 0:
        fail(f'model.{name}', getattr(self, name), 'must be >= 0 (0 selects the default)')
    check_choice('model.arch', self.arch, ARCHS)
    check_choice('model.pos', self.pos, POSITIONAL_ENCODINGS)
    check_choice('model.pos_combine', self.pos_combine, POS_COMBINES)
    check_choice('model.rope_scaling', self.rope_scaling, ROPE_SCALINGS)
    check_choice('model.norm', self.norm, NORMS)
    check_choice('model.norm_placement', self.norm_placement, NORM_PLACEMENTS)
    check_choice('model.ffn', self.ffn, FFNS)
    check_choice('model.attention_backend', self.attention_backend, ATTENTION_BACKENDS)
    check_choice('model.dtype', self.dtype, DTYPES)
    check_choice('model.param_dtype', self.param_dtype, DTYPES)
    if self.d_model % self.num_heads:
      fail('model.d_model', self.d_model, f'must be divisible by model.num_heads={self.num_heads}')
    if self.num_heads % self.kv_heads:
      fail('model.num_kv_heads', self.num_kv_heads,
           f'model.num_heads={self.num_heads} must be divisible by it')
    if self.pos in ROTARY_ENCODINGS:
      if self.head_dim % 2:
        fail('model.pos', self.pos, f'{self.pos} rotates pairs of dims and needs an even head '
             f'dimension, but d_model/num_heads = {self.head_dim}')
      if self.rotary_dim % 2 or self.rotary_dim == 0:
        fail('model.rope_fraction', self.rope_fraction,
             f'rope_fraction*head_dim must be a positive even number (head_dim={self.head_dim})')
    check_range('model.rope_fraction', self.rope_fraction, 0.0, 1.0)
    check_positive('model.rope_base', self.rope_base)
    if self.rope_factor < 1:
      fail('model.rope_factor', self.rope_factor, 'a context-extension factor must be >= 1')
    if self.rope_scaling != 'none':
      if self.pos != 'rope':
        fail('model.rope_scaling', self.rope_scaling, "needs model.pos='rope'")
      if self.rope_original_length <= 0:
        fail('model.rope_original_length', self.rope_original_length,
             f'rope_scaling={self.rope_scaling!r} needs the training length it extends from (> 0)')
    if self.yarn_beta_fast <= self.yarn_beta_slow:
      fail('model.yarn_beta_fast', self.yarn_beta_fast,
           f'must exceed model.yarn_beta_slow={self.yarn_beta_slow}')
    check_range('model.dropout', self.dropout, 0.0, 1.0)
    if self.pos_combine == 'concat' and self.pos_dim and self.pos_dim >= self.d_model:
      fail('model.pos_dim', self.pos_dim, f'must be smaller than model.d_model={self.d_model}')
    self._check_attention()
    from lcr.mixers import checks   # names and numbers only: no JAX
    checks.check_model(self)
    self._check_moe()

  def _check_moe(self):
    if not isinstance(self.moe, MoeConfig):
      fail('model.moe', self.moe, 'expected the section of MoE fields (lcr.config.MoeConfig)')
    if self.ffn != 'moe':
      default = MoeConfig()
      for f in dataclasses.fields(MoeConfig):
        if getattr(self.moe, f.name) != getattr(default, f.name):
          fail(f'model.moe.{f.name}', getattr(self.moe, f.name),
               f"has no effect unless model.ffn='moe' (model.ffn={self.ffn!r})")
      return
    if self.moe.every > self.num_layers:
      fail('model.moe.every', self.moe.every,
           f'must be at most model.num_layers={self.num_layers}, or no layer would be MoE')
    if self.scan_layers and self.num_layers % self.moe.every:
      fail('model.moe.every', self.moe.every,
           f'model.scan_layers=True scans groups of `every` layers, so it must divide '
           f'model.num_layers={self.num_layers}')

  def _check_attention(self):
    check_choice('model.attention', self.attention, ATTENTION_VARIANTS)
    for name in ('window', 'global_tokens', 'sink_tokens', 'attention_block',
                 'bigbird_random_blocks', 'length_scale_base'):
      if getattr(self, name) < 0:
        fail(f'model.{name}', getattr(self, name), 'must be >= 0')
    check_positive('model.attention_chunk', self.attention_chunk)
    if self.attention in ('sliding', 'longformer', 'sinks') and self.window <= 0:
      fail('model.window', self.window,
           f'model.attention={self.attention!r} needs the number of tokens a query sees (> 0)')
    if self.attention == 'sinks' and self.sink_tokens <= 0:
      fail('model.sink_tokens', self.sink_tokens, "model.attention='sinks' needs > 0 sink tokens")
    blocked = ('bigbird', 'blockwise', 'grouped', 'shifted_sparse')
    if self.attention in blocked and self.attention_block <= 0:
      fail('model.attention_block', self.attention_block,
           f'model.attention={self.attention!r} needs a block size in tokens (> 0)'
           + {'blockwise': '; Sun et al. 2022 use half the training length',
              'shifted_sparse': '; LongLoRA uses a quarter of the training length'}.get(
                  self.attention, ''))
    if self.attention == 'shifted_sparse':
      if self.attention_block % 2:
        fail('model.attention_block', self.attention_block,
             "model.attention='shifted_sparse' shifts half the heads by half a group: use an even size")
      if self.num_heads % 2:
        fail('model.num_heads', self.num_heads,
             "model.attention='shifted_sparse' shifts half of the heads: use an even number")
    if self.length_scaled_logits and self.length_scale_base <= 1:
      fail('model.length_scale_base', self.length_scale_base,
           'model.length_scaled_logits=True needs the training length (> 1)')
    check_choice('model.context_parallel', self.context_parallel, CONTEXT_PARALLEL)
    if self.context_parallel != 'none' and self.rope_scaling == 'dynamic_ntk':
      fail('model.context_parallel', self.context_parallel,
           "rope_scaling='dynamic_ntk' slices queries by index, which a sharded, load-balanced "
           "sequence does not keep; use 'none' (dynamic NTK is an evaluation-time scaling)")
    if self.attention_backend == 'cudnn' and self.dtype not in ('bfloat16', 'float16'):
      fail('model.attention_backend', self.attention_backend,
           f'cuDNN flash attention needs model.dtype bfloat16 or float16, not {self.dtype}')
    if self.attention_backend == 'cpu_flash':
      if self.dtype != 'float32':
        fail('model.attention_backend', self.attention_backend,
             f'the cpu_flash kernel computes in float32, not model.dtype={self.dtype!r}')
      if self.pos in ('alibi', 't5'):
        fail('model.attention_backend', self.attention_backend,
             f'the cpu_flash kernel takes no logit bias, so not model.pos={self.pos!r}')
      if self.head_dim % 16:
        fail('model.attention_backend', self.attention_backend,
             f'the cpu_flash kernel needs d_model/num_heads a multiple of 16, not {self.head_dim}')
    if self.attention_backend == 'splash':
      if self.pos in ('alibi', 't5'):
        fail('model.attention_backend', self.attention_backend,
             f'splash attention takes no additive bias, so not model.pos={self.pos!r}')
      if self.attention not in ('causal', 'sliding'):
        fail('model.attention_backend', self.attention_backend,
             f"splash runs model.attention 'causal' or 'sliding' only, not {self.attention!r}")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def rotary_dim(self) -> int:
    return int(round(self.head_dim * self.rope_fraction))

  @property
  def hidden_dim(self) -> int:
    return self.ffn_dim or 4 * self.d_model

  def ffn_kind(self, layer: int) -> str:
    """The FFN of layer ``layer`` (0-based): 'moe' for every ``moe.every``-th layer of an MoE
    model, its other layers are dense FFNs of type ``moe.expert_ffn``."""
    if self.ffn != 'moe':
      return self.ffn
    return 'moe' if (layer + 1) % self.moe.every == 0 else self.moe.expert_ffn

  @property
  def concat_pos_dim(self) -> int:
    return self.pos_dim or self.d_model // 4

  def check_length(self, length: int, field: str = 'length') -> None:
    """Fails before compilation when the model cannot serve ``length`` tokens."""
    check_positive(field, length)
    if self.pos == 'learned' and length > self.max_len:
      fail(field, length, f'model.pos=learned has a table of model.max_len={self.max_len} '
           'positions; raise model.max_len or evaluate at most that many tokens (JAX would '
           'silently clamp the lookup)')


def model_config(cfg: Mapping[str, Any] | None) -> ModelConfig:
  """``ModelConfig`` from the ``model`` part of a ConfigDict."""
  return from_mapping(ModelConfig, cfg, 'model')


EVAL_PROTOCOLS = ('nonoverlapping', 'sliding')
PASSKEY_MODES = ('teacher_forced', 'generate')


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate a checkpoint on: lengths, protocols, RoPE scalings, passkey retrieval."""
  lengths: tuple[int, ...] = ()          # absolute evaluation lengths; () = train length × multipliers
  multipliers: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
  protocols: tuple[str, ...] = ('nonoverlapping',)
  stride: int = 0                        # sliding protocol stride S; 0 = the training length
  rope_scalings: tuple[str, ...] = ('none', 'linear', 'ntk', 'dynamic_ntk', 'yarn')
  rope_factor: float = 0.0               # 0 = eval_len / train_len
  split: str = 'validation'
  max_tokens: int = 65536                # tokens scored per (length, protocol); bounds eval time
  batch_size: int = 8                    # windows per forward pass at the training length
  # True: documents are laid end to end and attention crosses their boundaries (the ALiBi paper's
  # protocol); False: each document is its own segment and positions restart at its start.
  attend_across_documents: bool = True
  # A learned position table past train_len: 'clamp' gives every position >= L the last trained
  # row, L - 1; 'untrained' uses the table's rows past L as initialised (they get no gradient).
  # Either way the table needs model.max_len >= the longest length (the study sizes it so).
  learned_positions: str = 'clamp'
  passkey: bool = False
  passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  passkey_trials: int = 20
  passkey_format: str = 'mj'             # 'mj' (Mohtashami & Jaggi's prompt) | 'compact' (43 tokens)
  passkey_lengths: tuple[int, ...] = ()  # () = the evaluation lengths
  # 'teacher_forced' (argmax of every answer token given the true prefix) and/or 'generate' (the
  # key greedily generated with the KV cache, exact match).
  passkey_modes: tuple[str, ...] = ('teacher_forced',)

  def __post_init__(self):
    for i, length in enumerate(self.lengths):
      check_positive(f'eval.lengths[{i}]', length)
    for i, m in enumerate(self.multipliers):
      check_positive(f'eval.multipliers[{i}]', m)
    for p in self.protocols:
      check_choice('eval.protocols', p, EVAL_PROTOCOLS)
    for s in self.rope_scalings:
      check_choice('eval.rope_scalings', s, ROPE_SCALINGS)
    if self.stride < 0:
      fail('eval.stride', self.stride, 'must be >= 0 (0 = the training length)')
    if self.rope_factor and self.rope_factor < 1:
      fail('eval.rope_factor', self.rope_factor, 'must be >= 1, or 0 for eval_len / train_len')
    check_positive('eval.max_tokens', self.max_tokens)
    check_positive('eval.batch_size', self.batch_size)
    for d in self.passkey_depths:
      check_range('eval.passkey_depths', d, 0.0, 1.0)
    check_positive('eval.passkey_trials', self.passkey_trials)
    check_choice('eval.learned_positions', self.learned_positions, ('untrained', 'clamp'))
    # The formats of lcr.passkey.FORMATS (tests/test_passkey.py checks that the two agree).
    check_choice('eval.passkey_format', self.passkey_format, ('mj', 'compact'))
    for i, length in enumerate(self.passkey_lengths):
      check_positive(f'eval.passkey_lengths[{i}]', length)
    if not self.passkey_modes:
      fail('eval.passkey_modes', self.passkey_modes, "name at least one of 'teacher_forced', 'generate'")
    for mode in self.passkey_modes:
      check_choice('eval.passkey_modes', mode, PASSKEY_MODES)

  def eval_lengths(self, train_len: int) -> tuple[int, ...]:
    return self.lengths or tuple(train_len * m for m in self.multipliers)


DECODE_STRATEGIES = ('greedy', 'sample', 'beam')


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Generation (lcr.decode): strategy, its knobs, and when to stop."""
  strategy: str = 'greedy'         # greedy | sample | beam
  temperature: float = 1.0         # sample: logits / temperature (applied first)
  top_k: int = 0                   # sample: keep the k most likely tokens (0 = off)
  top_p: float = 1.0               # sample: nucleus mass, in (0, 1] (1 = off), Holtzman et al. 2020
  min_tokens_to_keep: int = 1      # sample: top-k and top-p keep at least this many tokens
  num_beams: int = 4               # beam: beams per prompt; the n best hypotheses are returned
  length_penalty: float = 0.6      # beam: GNMT α in ((5 + |Y|) / 6)^α (Wu et al. 2016 eq. 14)
  max_new_tokens: int = 64
  seed: int = 0                    # sample: the same seed gives the same text on any device count
  stop: tuple[str, ...] = ()       # generation of a row ends after any of these strings
  use_cache: bool = True           # False: a full forward per step (the reference for debugging)
  # Dynamic NTK only: cache keys after rotation, each with the base of the step it was made at
  # (Hugging Face generate's cache; it drifts from the full forward, transformers issue 25104).
  rotated_key_cache: bool = False

  def __post_init__(self):
    check_choice('decode.strategy', self.strategy, DECODE_STRATEGIES)
    check_positive('decode.temperature', self.temperature)
    if self.top_k < 0:
      fail('decode.top_k', self.top_k, 'must be >= 0 (0 = off)')
    if not 0.0 < self.top_p <= 1.0:
      fail('decode.top_p', self.top_p, 'must be in (0, 1] (1 = off)')
    if self.min_tokens_to_keep < 1:
      fail('decode.min_tokens_to_keep', self.min_tokens_to_keep, 'must be >= 1')
    if self.num_beams < 1:
      fail('decode.num_beams', self.num_beams, 'must be >= 1')
    check_positive('decode.max_new_tokens', self.max_new_tokens)
    for stop in self.stop:
      if not isinstance(stop, str) or not stop:
        fail('decode.stop', self.stop, 'expected non-empty strings')


# ----------------------------------------------------------------------------------------------
# Training, device mesh and the top-level config.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, logging, evaluation and checkpoint cadence (step counts are optimizer steps)."""
  steps: int = 1000
  batch_size: int = 32             # global batch (sequences per step, summed over all hosts)
  seq_len: int = 256               # training length T
  lr: float = 3e-4                 # peak learning rate, reached after the warmup
  warmup_steps: int = 100          # linear warmup from 0
  min_lr_ratio: float = 0.1        # cosine decay ends at lr * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1        # AdamW (Loshchilov & Hutter 2019); never on norms or biases
  grad_clip: float = 1.0           # clip by global norm; 0 = off
  log_every: int = 50
  eval_every: int = 500            # validation loss at seq_len; 0 = only after the last step
  eval_batches: int = 8            # validation batches of batch_size per evaluation
  checkpoint_every: int = 500      # 0 = only after the last step (and on SIGTERM)
  keep_checkpoints: int = 3        # the last K checkpoints are kept
  tensorboard: bool = True         # also write TensorBoard event files to workdir/tensorboard
  # Start from the parameters of another run: its workdir, checkpoints/ directory or one step's
  # directory (not its optimizer state or data position; '' = fresh initialisation).
  init_from: str = ''
  # init_from: a learned position table shorter than this model's keeps its trained rows and
  # takes the rest from this run's initialisation (otherwise a shape mismatch is an error).
  init_extend_positions: bool = False

  def __post_init__(self):
    for name in ('steps', 'batch_size', 'seq_len', 'lr', 'log_every', 'eval_batches',
                 'keep_checkpoints', 'eps'):
      check_positive(f'train.{name}', getattr(self, name))
    for name in ('warmup_steps', 'eval_every', 'checkpoint_every', 'weight_decay', 'grad_clip'):
      if getattr(self, name) < 0:
        fail(f'train.{name}', getattr(self, name), 'must be >= 0')
    check_range('train.min_lr_ratio', self.min_lr_ratio, 0.0, 1.0)
    check_range('train.b1', self.b1, 0.0, 1.0)
    check_range('train.b2', self.b2, 0.0, 1.0)


MeshRule = tuple[str, Any]   # (logical axis name, mesh axis | tuple of mesh axes | None)

# Mesh axes the rules may name whether or not ``mesh.axes`` has them. A mesh may leave any of them
# out (e.g. axes ('data', 'expert')): it then has size 1 there, and MeshConfig.active_rules drops
# the rules' mention of it (the default rules name 'expert' and 'sequence'; the default mesh has
# neither).
KNOWN_MESH_AXES = ('data', 'fsdp', 'tensor', 'expert', 'sequence')

DEFAULT_RULES: tuple[MeshRule, ...] = (
    # Expert parallelism (GShard, Lepikhin et al. 2020 §2.2): experts over 'expert', and the batch
    # over data × expert; the experts' inputs [experts, batch, ...] keep the rest of the batch axes.
    ('expert', 'expert'),
    ('batch', ('data', 'fsdp', 'expert')),
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('length', 'sequence'),
    ('kv', None),
    ('layers', None),
)


def _rule(value: Any) -> MeshRule:
  name, axes = value
  return name, tuple(axes) if isinstance(axes, (list, tuple)) else axes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh: one size per named axis (one size may be -1 = the remaining devices).

  ``rules`` map the model's logical axis names onto mesh axes, in order of precedence (flax
  ``logical_to_mesh``); a logical axis no rule names is replicated. Rules may name any of
  ``KNOWN_MESH_AXES``; those the mesh lacks are dropped (e.g. 'length' → 'sequence' only shards
  the sequence when ``axes`` has a 'sequence' axis).
  """
  axes: tuple[str, ...] = ('data', 'fsdp', 'tensor')
  shape: tuple[int, ...] = (-1, 1, 1)
  rules: tuple[MeshRule, ...] = DEFAULT_RULES

  def __post_init__(self):
    try:
      rules = tuple(_rule(r) for r in self.rules)
    except (TypeError, ValueError):
      fail('mesh.rules', self.rules, "expected pairs (logical_axis, mesh_axes), e.g. "
           "(('batch', ('data', 'fsdp')), ('embed', 'fsdp'))")
    object.__setattr__(self, 'axes', tuple(self.axes))
    object.__setattr__(self, 'rules', rules)
    object.__setattr__(self, 'shape', tuple(self.shape))
    if len(set(self.axes)) != len(self.axes) or not all(isinstance(a, str) for a in self.axes):
      fail('mesh.axes', self.axes, 'expected distinct axis names')
    if len(self.shape) != len(self.axes):
      fail('mesh.shape', self.shape, f'needs one size per axis of mesh.axes={self.axes}')
    if any(not isinstance(s, int) or (s < 1 and s != -1) for s in self.shape):
      fail('mesh.shape', self.shape, 'sizes must be positive integers, or -1 for one axis')
    if list(self.shape).count(-1) > 1:
      fail('mesh.shape', self.shape, 'at most one size may be -1 (the remaining devices)')
    for name, axes in self.rules:
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        if axis is not None and axis not in self.axes and axis not in KNOWN_MESH_AXES:
          fail('mesh.rules', (name, axes), f'names mesh axis {axis!r}, not one of {self.axes}')

  @property
  def active_rules(self) -> tuple[MeshRule, ...]:
    """``rules`` without the known mesh axes (e.g. 'expert') this mesh does not have."""
    def keep(axes):
      if isinstance(axes, tuple):
        kept = tuple(a for a in axes if a in self.axes)
        return kept or None
      return axes if axes is None or axes in self.axes else None
    return tuple((name, keep(axes)) for name, axes in self.rules)

  def axes_of(self, logical: str) -> tuple[str, ...]:
    """The mesh axes the first rule for ``logical`` maps it to (() = replicated)."""
    for name, axes in self.active_rules:
      if name == logical:
        return () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    return ()


PEFT_METHODS = ('none', 'lora', 'adapter')


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient fine-tuning (lcr/peft.py): which parameters train, and what is added.

  ``method='none'`` trains every parameter. ``lora`` (Hu et al. 2021) adds a rank-``rank`` update
  B·A, scaled by alpha / rank, beside each matmul kernel whose path ``targets`` matches (re.search
  over paths like 'layer_0/attention/query/kernel'); ``adapter`` (Houlsby et al. 2019) adds a
  bottleneck of ``adapter_dim`` after every attention and FFN sublayer. The base parameters are
  frozen; ``trainable_extra`` (a regex over parameter paths) unfreezes more of them, e.g.
  LongLoRA's embeddings and norms: 'token_embedding|norm'.
  """
  method: str = 'none'
  rank: int = 8
  alpha: float = 16.0
  targets: str = r'attention/(query|key|value|out)/kernel'
  adapter_dim: int = 16
  trainable_extra: str = ''

  def __post_init__(self):
    check_choice('peft.method', self.method, PEFT_METHODS)
    check_positive('peft.rank', self.rank)
    check_positive('peft.alpha', self.alpha)
    check_positive('peft.adapter_dim', self.adapter_dim)
    for name in ('targets', 'trainable_extra'):
      try:
        re.compile(getattr(self, name))
      except re.error as err:
        fail(f'peft.{name}', getattr(self, name), f'not a regular expression ({err})')
    if self.method == 'lora' and not self.targets:
      fail('peft.targets', self.targets, "peft.method='lora' needs a regex naming the kernels it adapts")
    if self.trainable_extra and self.method == 'none':
      fail('peft.trainable_extra', self.trainable_extra,
           "needs peft.method 'lora' or 'adapter' (with 'none' every parameter trains already)")


def _default_data_config():
  from lcr.data.config import DataConfig  # the data room imports this module: import lazily
  return DataConfig()


def _default_seq2seq_config():
  from lcr.seq2seq.config import Seq2SeqConfig  # imports this module: import lazily
  return Seq2SeqConfig()


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one run needs; ``from_config_dict`` builds it from an ml_collections file."""
  seed: int = 0
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: 'DataConfig' = dataclasses.field(default_factory=_default_data_config)  # noqa: F821
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
  peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
  seq2seq: 'Seq2SeqConfig' = dataclasses.field(default_factory=_default_seq2seq_config)  # noqa: F821

  def __post_init__(self):
    if not isinstance(self.seed, int) or isinstance(self.seed, bool):
      fail('seed', self.seed, 'expected an integer')
    self.model.check_length(self.train.seq_len, 'train.seq_len')
    from lcr.mixers import checks
    checks.check_run(self)


def _data_config(values: Mapping[str, Any] | None):
  from lcr.data import config as data_config  # the data room imports this module: import lazily
  return from_mapping(data_config.DataConfig, values, 'data')


def _seq2seq_config(values: Mapping[str, Any] | None):
  from lcr.seq2seq import config as seq2seq_config  # imports this module: import lazily
  return seq2seq_config.seq2seq_config(values)


_SECTIONS = {'model': model_config, 'data': _data_config,
             'train': lambda v: from_mapping(TrainConfig, v, 'train'),
             'eval': lambda v: from_mapping(EvalConfig, v, 'eval'),
             'mesh': lambda v: from_mapping(MeshConfig, v, 'mesh'),
             'decode': lambda v: from_mapping(DecodeConfig, v, 'decode'),
             'peft': lambda v: from_mapping(PeftConfig, v, 'peft'),
             'seq2seq': _seq2seq_config}


def from_config_dict(config_dict: Mapping[str, Any]) -> Config:
  """The validated :class:`Config` of a ConfigDict (or a plain nested dict, e.g. config.json)."""
  values = dict(config_dict.items())
  known = {'seed', *_SECTIONS}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f'config field {unknown[0]} does not exist; top-level fields are: '
                      f'{", ".join(sorted(known))}')
  seed = _coerce('seed', values.get('seed', 0), int)
  return Config(seed=seed, **{name: build(values.get(name)) for name, build in _SECTIONS.items()})
