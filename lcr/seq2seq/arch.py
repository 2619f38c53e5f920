"""The two architectures a study compares, behind one interface, chosen by ``model.arch``.

* ``encoder_decoder``: lcr.seq2seq.model.EncoderDecoder; features ``source``, ``target_in``
  ([BOS] + output[:-1]), ``target_out`` (the output, EOS included) and ``weights`` (per output token).
* ``decoder``: lcr.model.TransformerLM run on [source, SEP, output] with the loss on the output only
  (the decoder-only setup of Kazemnejad et al. 2023): features ``inputs``, ``targets``, ``weights``
  (0 on the source and separator).

Each gives ``features`` of one example, the row lengths one example needs at the training length,
``forward`` (teacher-forced log-probabilities of every target, ``Scores``), a decoding ``stepper``
for lcr.decode's loops, and ``prompts`` for a batch of sources.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lcr.config import Config, DecodeConfig
from lcr.decode import engine
from lcr.model import TransformerLM
from lcr.seq2seq import tasks
from lcr.seq2seq.model import EncoderDecoder
from lcr.seq2seq.stepper import EncoderDecoderStepper


class Scores(NamedTuple):
  """Teacher-forced scores of a batch: what the losses need."""
  log_probs: jax.Array                 # [B, T, V] float32
  targets: jax.Array                   # [B, T]
  mask: jax.Array                      # [B, T] 1 on output tokens
  weights: jax.Array                   # [B, T] per-token loss weights (1 for gold data)
  attention: tuple[jax.Array, ...] = ()   # encoder-decoder: α [B, H, T, S] per layer
  p_gen: jax.Array | None = None


def _rngs(rng):
  if rng is None:
    return {}
  return {'dropout': jax.random.fold_in(rng, 0), 'noise': jax.random.fold_in(rng, 1)}


class EncoderDecoderArch:
  name = 'encoder_decoder'

  def __init__(self, config: Config):
    self.config, self.cfg, self.tips = config, config.model, config.seq2seq
    self.task = tasks.REGISTRY[self.tips.task.name]

  def model(self, *, deterministic: bool = True, mode: str = 'expected') -> EncoderDecoder:
    return EncoderDecoder(self.cfg, self.tips, deterministic=deterministic, mode=mode)

  def features(self, source: np.ndarray, output: np.ndarray,
               weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``output`` ends with EOS when the sequence ended; ``weights`` per output token."""
    return {'source': source, 'target_in': np.concatenate([[tasks.BOS_ID], output[:-1]]).astype(np.int32),
            'target_out': output.astype(np.int32),
            'weights': np.ones(len(output), np.float32) if weights is None else weights.astype(np.float32)}

  def row_lengths(self) -> dict[str, int]:
    n = self.tips.task.train_len
    out = self.task.max_target(n) + 1
    return {'source': self.task.max_source(n), 'target_in': out, 'target_out': out, 'weights': out}

  def init(self, rng: jax.Array) -> Any:
    """Parameters, boxed with their logical axis names (nn.meta.unbox for the arrays)."""
    row = self.row_lengths()
    src = jnp.zeros((1, row['source']), jnp.int32)
    tgt = jnp.zeros((1, row['target_in']), jnp.int32)
    return self.model().init({'params': rng}, src, src, src + 1, tgt, tgt, tgt + 1)['params']

  def forward(self, params, batch, *, rng=None, mode: str = 'expected', inputs=None) -> Scores:
    model = self.model(deterministic=rng is None, mode=mode)
    out = model.apply({'params': params}, batch['source'], batch['source_positions'],
                      batch['source_segment_ids'], batch['target_in'] if inputs is None else inputs,
                      batch['target_in_positions'], batch['target_in_segment_ids'], rngs=_rngs(rng))
    mask = (batch['target_out_segment_ids'] > 0).astype(jnp.float32)
    return Scores(out.log_probs, batch['target_out'], mask, batch['weights'] * mask, out.attention,
                  out.p_gen)

  def stepper(self, decode: DecodeConfig, prompt_len: int, *, mode: str | None = None,
              deterministic: bool = True) -> EncoderDecoderStepper:
    """``mode`` None: decoding's, ``seq2seq.monotonic_decode`` (matters for monotonic attention)."""
    return EncoderDecoderStepper(self.cfg, self.tips, decode, prompt_len,
                                 mode=mode or self.tips.monotonic_decode, deterministic=deterministic)

  def prompt_width(self, source_len: int, prefix_len: int) -> int:
    return 1 + prefix_len

  def prompts(self, params, sources: Sequence[np.ndarray], prefixes: Sequence[np.ndarray] | None,
              source_len: int, prefix_len: int):
    """(carry, prompt [B, P], lengths [B]): [BOS] + prefix, the sources (padded to ``source_len``)
    in the carry; P = prompt_width(source_len, prefix_len)."""
    prefixes = prefixes or [np.zeros(0, np.int32)] * len(sources)
    source, source_lengths = _pad(sources, source_len)
    prompt, lengths = _pad([np.concatenate([[tasks.BOS_ID], p]) for p in prefixes],
                           self.prompt_width(source_len, prefix_len))
    return (params, jnp.asarray(source), jnp.asarray(source_lengths)), prompt, lengths


class DecoderArch:
  name = 'decoder'

  def __init__(self, config: Config):
    self.config, self.cfg, self.tips = config, config.model, config.seq2seq
    self.task = tasks.REGISTRY[self.tips.task.name]

  def model(self) -> TransformerLM:
    return TransformerLM(self.cfg)

  def features(self, source: np.ndarray, output: np.ndarray,
               weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    z = np.concatenate([source, [tasks.SEP_ID], output]).astype(np.int32)
    is_output = (np.arange(len(z) - 1) >= len(source)).astype(np.int32)
    w = np.zeros(len(z) - 1, np.float32)
    w[len(source):] = 1.0 if weights is None else weights
    return {'inputs': z[:-1], 'targets': z[1:], 'output': is_output, 'weights': w}

  def row_lengths(self) -> dict[str, int]:
    n = self.tips.task.train_len
    size = self.task.max_source(n) + self.task.max_target(n) + 1
    return {'inputs': size, 'targets': size, 'output': size, 'weights': size}

  def init(self, rng: jax.Array) -> Any:
    tokens = jnp.zeros((1, self.row_lengths()['inputs']), jnp.int32)
    return self.model().init({'params': rng}, tokens, tokens, tokens + 1)['params']

  def forward(self, params, batch, *, rng=None, mode: str = 'expected', inputs=None) -> Scores:
    del mode, inputs
    logits = self.model().apply({'params': params}, batch['inputs'], batch['inputs_positions'],
                                batch['inputs_segment_ids'], deterministic=rng is None,
                                rngs=_rngs(rng))
    mask = batch['output'].astype(jnp.float32)
    return Scores(jax.nn.log_softmax(logits, axis=-1), batch['targets'], mask, batch['weights'] * mask)

  def stepper(self, decode: DecodeConfig, prompt_len: int, *, mode: str | None = None,
              deterministic: bool = True) -> engine.Stepper:
    del mode, deterministic
    return engine.Stepper(self.cfg, decode, prompt_len)

  def prompt_width(self, source_len: int, prefix_len: int) -> int:
    return source_len + 1 + prefix_len

  def prompts(self, params, sources: Sequence[np.ndarray], prefixes: Sequence[np.ndarray] | None,
              source_len: int, prefix_len: int):
    """(params, prompt [B, P], lengths [B]): source + [SEP] + prefix, right-padded."""
    prefixes = prefixes or [np.zeros(0, np.int32)] * len(sources)
    prompt, lengths = _pad([np.concatenate([s, [tasks.SEP_ID], p]) for s, p in zip(sources, prefixes)],
                           self.prompt_width(source_len, prefix_len))
    return params, prompt, lengths


def _pad(rows: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
  """([B, width] right-padded int32 rows, [B] lengths); every row needs 1 … width tokens."""
  lengths = np.asarray([len(r) for r in rows], np.int32)
  if lengths.min() < 1 or lengths.max() > width:
    raise ValueError(f'rows of {lengths.min()} … {lengths.max()} tokens do not fit width {width}')
  out = np.full((len(rows), width), tasks.PAD_ID, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, lengths


ARCHS = {'encoder_decoder': EncoderDecoderArch, 'decoder': DecoderArch}


def make(config: Config):
  return ARCHS[config.model.arch](config)
