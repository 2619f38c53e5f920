"""Validation of the mixer and memory fields of a config: one ConfigError naming the field.

Called from lcr.config (``ModelConfig.__post_init__`` and ``Config.__post_init__``); it reads names
and numbers only, so validating a config imports no JAX code.
"""

from __future__ import annotations

from typing import Any

from lcr.config import (MEMORIES, MEMORY_UPDATES, MIXERS, check_choice, check_positive, fail)

# Encodings a memory can use: relative ones (a function of q − k), or none. Absolute positions
# would have to continue across segments, and xPos's and dynamic NTK's centre or base moves with
# the length.
MEMORY_ENCODINGS = ('rope', 'alibi', 't5', 'none')
# Encodings that act on a token mixer without softmax attention: on the embedding, or none.
MIXER_ENCODINGS = ('none', 'learned', 'sinusoidal')


def check_model(cfg: Any) -> None:
  """The ``model.mixer``/``model.memory`` fields of a ModelConfig, and what they exclude."""
  check_choice('model.mixer', cfg.mixer, MIXERS)
  check_choice('model.memory', cfg.memory, MEMORIES)
  check_choice('model.memory_update', cfg.memory_update, MEMORY_UPDATES)
  for name in ('mixer_chunk', 'memory_length', 'segment_length', 'ssm_dt_rank'):
    if getattr(cfg, name) < 0:
      fail(f'model.{name}', getattr(cfg, name), 'must be >= 0')
  for name in ('ssm_state', 'ssm_conv', 'ssm_expand'):
    check_positive(f'model.{name}', getattr(cfg, name))
  if cfg.mixer != 'attention':
    _check_mixer(cfg)
  if cfg.memory != 'none':
    _check_memory(cfg)
  if has_state(cfg):
    _check_whole_sequence(cfg)


def _check_mixer(cfg: Any) -> None:
  what = f'model.mixer={cfg.mixer!r} computes no softmax attention'
  if cfg.memory != 'none':
    fail('model.memory', cfg.memory, f"a memory belongs to attention; {what}")
  if cfg.attention != 'causal':
    fail('model.attention', cfg.attention, f"{what}, so no attention pattern but 'causal'")
  if cfg.attention_backend != 'auto':
    fail('model.attention_backend', cfg.attention_backend, f"{what}; leave it 'auto'")
  if cfg.pos not in MIXER_ENCODINGS:
    fail('model.pos', cfg.pos, f'{cfg.pos} acts inside softmax attention; {what}: use one of '
         f'{", ".join(map(repr, MIXER_ENCODINGS))}'
         + (' (retention rotates its queries and keys itself)' if cfg.mixer == 'retention' else ''))
  if cfg.num_kv_heads not in (0, cfg.num_heads):
    fail('model.num_kv_heads', cfg.num_kv_heads, f'grouped keys are an attention option; {what}')
  if cfg.length_scaled_logits:
    fail('model.length_scaled_logits', True, f'scales attention logits; {what}')
  if cfg.mixer == 'retention' and cfg.head_dim % 2:
    fail('model.num_heads', cfg.num_heads, 'retention rotates pairs of dims and needs an even '
         f'd_model/num_heads, not {cfg.head_dim}')


def _check_memory(cfg: Any) -> None:
  name = f'model.memory={cfg.memory!r}'
  if cfg.segment_length <= 0:
    fail('model.segment_length', cfg.segment_length, f'{name} needs the tokens per segment (> 0)')
  if cfg.memory == 'xl' and cfg.memory_length <= 0:
    fail('model.memory_length', cfg.memory_length,
         f'{name} needs the hidden states each segment keeps from before it (> 0)')
  if cfg.attention != 'causal':
    fail('model.attention', cfg.attention, f"{name} sets which keys a query sees; use 'causal'")
  if cfg.pos not in MEMORY_ENCODINGS:
    fail('model.pos', cfg.pos, f'{name} needs a relative encoding or none: one of '
         f'{", ".join(map(repr, MEMORY_ENCODINGS))}')
  if cfg.rope_scaling != 'none':
    fail('model.rope_scaling', cfg.rope_scaling, f'{name} never sees a distance past its memory '
         'and segment: no scaling applies')
  if cfg.length_scaled_logits:
    fail('model.length_scaled_logits', True, f'{name} sees a bounded number of keys')
  if cfg.attention_backend == 'splash':
    fail('model.attention_backend', cfg.attention_backend,
         f"splash runs causal and sliding masks only, not {name}'s")


def _check_whole_sequence(cfg: Any) -> None:
  """Options that a recurrent state, which runs through the sequence in order, cannot serve."""
  name = (f'model.mixer={cfg.mixer!r}' if cfg.mixer != 'attention'
          else f'model.memory={cfg.memory!r}')
  if getattr(cfg, 'context_parallel', 'none') != 'none':
    fail('model.context_parallel', cfg.context_parallel, f'{name} carries a state through the '
         "sequence in order; it cannot be split over devices (use 'none')")
  if getattr(cfg, 'arch', 'decoder') != 'decoder':
    fail('model.arch', cfg.arch, f"{name} is a layer of the decoder-only LM (lcr.model); use "
         "'decoder'")


def has_state(cfg: Any) -> bool:
  """Does a model with this ModelConfig carry a recurrent state from one call to the next?"""
  return cfg.mixer != 'attention' or cfg.memory != 'none'


def check_run(config: Any) -> None:
  """Fields of different sections that must agree: data.contiguous needs a recurrent model."""
  if not getattr(config.data, 'contiguous', False):
    return
  model = config.model
  if not has_state(model):
    fail('data.contiguous', True, "carries a recurrent state across steps: it needs model.mixer "
         "other than 'attention' or model.memory other than 'none'")
  if model.pos in ('learned', 'sinusoidal'):
    fail('model.pos', model.pos, 'data.contiguous=True numbers positions along each row\'s whole '
         'stream; an absolute encoding would see positions far past train.seq_len')
