"""Perplexity, bits per byte and loss per position of a language model at any evaluation length.

Everything here works on a token stream and an ``apply_fn(tokens, positions, segment_ids) -> logits``,
so it serves any checkpoint, any positional encoding and any attention backend.

How an evaluation split is windowed
-----------------------------------
The documents are concatenated into one stream (the ALiBi paper's protocol on WikiText-103, Press et
al. 2022 §4), optionally with a separator token before each document, so a document shorter than a
window is neither dropped nor counted twice. Window positions restart at 0 in every window. With
``attend_across_documents=False`` each document gets its own segment id and positions restart at
every document start instead: attention then never crosses a document boundary, as in packed
training rows.

A stream of N tokens has N − 1 *targets* (token j + 1 is predicted from tokens ≤ j); at most
``max(max_tokens, eval_len)`` of them, the first ones, are scored. Windows are cut over targets:

* ``nonoverlapping``: window k covers targets [kL, (k+1)L) and scores all of them;
* ``sliding`` with stride S: window 0 covers [0, L) and scores all of it; window k ≥ 1 ends at
  e = L + kS, covers [e − L, e) and scores only its last S targets [e − S, e), so every scored
  token after the first window sees between L − S and L − 1 tokens of context.

The last window may end past the stream: its missing tail is padding with zero weight, so the final
partial window is scored, not dropped. Every target is scored exactly once in both protocols.
Windows are batched ``max(1, batch_size · train_len // eval_len)`` at a time, so a batch holds about
as many tokens at every length and memory stays bounded; each (eval_len, batch) shape compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcr import passkey as passkey_lib
from lcr.config import TRAINING_ONLY_ATTENTION, ConfigError, EvalConfig, ModelConfig
from lcr.model import TransformerLM

ApplyFn = passkey_lib.ApplyFn
PROTOCOLS = ('nonoverlapping', 'sliding')


@dataclasses.dataclass(frozen=True)
class Stream:
  """Tokens of an evaluation split laid end to end, with the document each token belongs to."""
  tokens: np.ndarray        # [N] int32
  documents: np.ndarray     # [N] int32, 1-based document index

  def __len__(self) -> int:
    return len(self.tokens)


def make_stream(documents: Sequence[np.ndarray] | np.ndarray, separator: int | None = None) -> Stream:
  """Concatenates documents (or wraps one stream) in order; ``separator`` is put before each one."""
  if isinstance(documents, np.ndarray) and documents.ndim == 1:
    documents = [documents]
  pieces, owners = [], []
  for i, doc in enumerate(documents, start=1):
    doc = np.asarray(doc, np.int32).reshape(-1)
    if separator is not None:
      doc = np.concatenate([np.asarray([separator], np.int32), doc])
    pieces.append(doc)
    owners.append(np.full(len(doc), i, np.int32))
  if not pieces or sum(map(len, pieces)) < 2:
    raise ValueError('the evaluation stream needs at least 2 tokens (one target)')
  return Stream(np.concatenate(pieces), np.concatenate(owners))


def stream_from_offsets(tokens: np.ndarray, doc_offsets: np.ndarray) -> Stream:
  """A Stream of already concatenated documents, document i being tokens[offsets[i]:offsets[i+1]]."""
  tokens = np.asarray(tokens, np.int32)
  lengths = np.diff(np.asarray(doc_offsets, np.int64))
  if lengths.sum() != len(tokens) or np.any(lengths < 0):
    raise ValueError(f'doc_offsets do not partition {len(tokens)} tokens')
  return Stream(tokens, np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths))


def plan_windows(num_targets: int, eval_len: int, protocol: str, stride: int = 0) -> np.ndarray:
  """[W, 3] int64 rows (start, end, score_from) over target indices; ``end`` may pass num_targets."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'unknown protocol {protocol!r}; known: {PROTOCOLS}')
  if num_targets < 1 or eval_len < 1:
    raise ValueError(f'need num_targets >= 1 and eval_len >= 1, got {num_targets}, {eval_len}')
  if protocol == 'nonoverlapping':
    starts = np.arange(0, num_targets, eval_len)
    return np.stack([starts, starts + eval_len, starts], axis=1)
  if not 0 < stride <= eval_len:
    raise ValueError(f'sliding stride must be in [1, eval_len={eval_len}], got {stride}')
  # Window 0 ends at L; each later one ends S further and exists while it has a target to score.
  ends = np.concatenate([[eval_len], np.arange(eval_len + stride, num_targets + stride, stride)])
  score_from = np.where(ends == eval_len, 0, ends - stride)
  return np.stack([ends - eval_len, ends, score_from], axis=1)


def windows_per_batch(batch_size: int, train_len: int, eval_len: int) -> int:
  """Windows per forward pass: about batch_size · train_len tokens at every evaluation length."""
  return max(1, batch_size * train_len // eval_len)


def _positions(documents: np.ndarray) -> np.ndarray:
  """Index of each token since the start of its run of equal document ids (row-wise, [B, L])."""
  idx = np.broadcast_to(np.arange(documents.shape[1]), documents.shape)
  starts = np.ones(documents.shape, bool)
  starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
  return idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)


def iterate_batches(stream: Stream, plan: np.ndarray, eval_len: int, batch: int, num_targets: int,
                    *, attend_across_documents: bool = True,
                    max_position: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields fixed-shape [batch, eval_len] arrays: inputs, targets, positions, segment_ids, weights.

  Rows past the plan and tokens past ``num_targets`` are padding with zero weight. ``max_position``
  clamps positions (an explicit policy for a learned table evaluated past its trained rows).
  """
  offsets = np.arange(eval_len)
  for b in range(0, len(plan), batch):
    rows = plan[b:b + batch]
    idx = np.zeros((batch, eval_len), np.int64)
    idx[:len(rows)] = rows[:, :1] + offsets
    weights = np.zeros((batch, eval_len), np.float32)
    weights[:len(rows)] = ((idx[:len(rows)] >= rows[:, 2:3]) & (idx[:len(rows)] < num_targets))
    safe = np.minimum(idx, num_targets - 1)
    docs = stream.documents[safe]
    if attend_across_documents:
      positions = np.broadcast_to(offsets, idx.shape).copy()
      segments = np.ones_like(docs)
    else:
      positions, segments = _positions(docs), docs
    if max_position is not None:
      positions = np.minimum(positions, max_position)
    yield dict(inputs=stream.tokens[safe], targets=stream.tokens[safe + 1],
               positions=positions.astype(np.int32), segment_ids=segments.astype(np.int32),
               weights=weights)


@dataclasses.dataclass
class Scores:
  """Summed negative log-likelihood (nats) and what it was summed over."""
  nll: float
  tokens: int
  bytes: int
  position_nll: np.ndarray     # [eval_len] NLL summed over windows, by position in the window
  position_count: np.ndarray   # [eval_len] targets scored at each position

  @property
  def loss(self) -> float:
    return self.nll / self.tokens

  @property
  def ppl(self) -> float:
    return math.exp(self.loss) if self.loss < 700 else math.inf

  @property
  def bpb(self) -> float:
    """Bits per UTF-8 byte: total NLL / ln 2 / bytes of the scored targets."""
    return self.nll / math.log(2) / self.bytes if self.bytes else float('nan')

  def position_loss(self) -> np.ndarray:
    with np.errstate(invalid='ignore', divide='ignore'):
      return self.position_nll / self.position_count


def nll_fn(apply_fn: ApplyFn) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """jit(inputs, targets, positions, segment_ids, weights) → (per-position NLL sums, counts)."""
  def fn(inputs, targets, positions, segment_ids, weights):
    logits_BxLxV = apply_fn(inputs, positions, segment_ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    nll_BxL = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    nll_BxL = jnp.where(weights > 0, nll_BxL, 0.0) * weights
    return nll_BxL.sum(axis=0), weights.sum(axis=0)
  return jax.jit(fn)


def score_stream(apply_fn: ApplyFn, stream: Stream, *, eval_len: int, protocol: str = 'nonoverlapping',
                 stride: int = 0, max_tokens: int | None = None, batch_size: int = 8,
                 train_len: int | None = None, byte_lengths: np.ndarray | None = None,
                 attend_across_documents: bool = True, max_position: int | None = None,
                 jitted: Callable[..., tuple[jax.Array, jax.Array]] | None = None) -> Scores:
  """Scores the first max(max_tokens, eval_len) targets of ``stream`` with windows of ``eval_len``.

  ``stride`` (sliding only) defaults to ``train_len``; ``batch_size`` windows of ``train_len``
  (default eval_len) set the tokens per forward pass; ``byte_lengths[id]`` is the UTF-8 size of
  each token id (bits per byte are NaN without it). ``jitted`` reuses a compiled ``nll_fn``.
  """
  train_len = train_len or eval_len
  num_targets = len(stream) - 1
  if max_tokens is not None:
    num_targets = min(num_targets, max(max_tokens, eval_len))
  if protocol == 'sliding':
    stride = min(stride or train_len, eval_len)
  plan = plan_windows(num_targets, eval_len, protocol, stride)
  batch = windows_per_batch(batch_size, train_len, eval_len)
  jitted = jitted or nll_fn(apply_fn)
  outputs, total_bytes = [], 0
  for arrays in iterate_batches(stream, plan, eval_len, batch, num_targets,
                                attend_across_documents=attend_across_documents,
                                max_position=max_position):
    outputs.append(jitted(arrays['inputs'], arrays['targets'], arrays['positions'],
                          arrays['segment_ids'], arrays['weights']))
    if byte_lengths is not None:
      total_bytes += int(np.sum(np.asarray(byte_lengths)[arrays['targets']] * arrays['weights']))
  position_nll = np.sum([np.asarray(o[0], np.float64) for o in outputs], axis=0)
  position_count = np.rint(np.sum([np.asarray(o[1], np.float64) for o in outputs], axis=0))
  tokens = int(position_count.sum())
  if tokens != num_targets:
    raise AssertionError(f'scored {tokens} targets, expected {num_targets}')
  return Scores(float(position_nll.sum()), tokens, total_bytes, position_nll,
                position_count.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Evaluation-time RoPE scalings.


def scaled_config(model_cfg: ModelConfig, scaling: str, eval_len: int, train_len: int,
                  factor: float = 0.0) -> ModelConfig:
  """The model config that evaluates ``model_cfg`` (trained at ``train_len``) under ``scaling``.

  factor = eval_len / train_len unless ``factor`` is set. A scaling that changes nothing at this
  length (factor 1 for linear/ntk/yarn; dynamic NTK while eval_len ≤ train_len) returns the
  unscaled config, so identical evaluations compare equal and are computed once.
  """
  if scaling != 'none' and model_cfg.pos != 'rope':
    raise ConfigError(f'eval.rope_scalings={scaling!r} applies to model.pos=rope only, '
                      f'not {model_cfg.pos!r}')
  factor = max(1.0, float(factor or eval_len / train_len))
  if scaling == 'none' or (scaling == 'dynamic_ntk' and eval_len <= train_len) or (
      scaling != 'dynamic_ntk' and factor == 1.0):
    return model_cfg
  return dataclasses.replace(model_cfg, rope_scaling=scaling, rope_factor=factor,
                             rope_original_length=train_len)


def effective_factor(model_cfg: ModelConfig) -> float:
  return model_cfg.rope_factor if model_cfg.rope_scaling != 'none' else 1.0


# ----------------------------------------------------------------------------------------------
# One trained model over the grid of lengths × protocols × RoPE scalings.


@dataclasses.dataclass(frozen=True)
class Task:
  """One perplexity evaluation of a trained model."""
  rope_scaling: str
  protocol: str
  eval_len: int
  stride: int        # sliding stride S; 0 for non-overlapping windows


def plan_tasks(model_cfg: ModelConfig, eval_cfg: EvalConfig, train_len: int) -> list[Task]:
  """Every (scaling, protocol, length) to evaluate; scalings other than 'none' for RoPE only."""
  scalings = eval_cfg.rope_scalings if model_cfg.pos == 'rope' else ('none',)
  tasks = []
  for protocol in eval_cfg.protocols:
    for scaling in scalings:
      for n in eval_cfg.eval_lengths(train_len):
        stride = min(eval_cfg.stride or train_len, n) if protocol == 'sliding' else 0
        tasks.append(Task(scaling, protocol, n, stride))
  return tasks


def learned_position_limit(model_cfg: ModelConfig, eval_cfg: EvalConfig, train_len: int,
                           eval_len: int) -> int | None:
  """The clamp on positions that ``eval.learned_positions`` asks for (None = no clamp)."""
  if model_cfg.pos != 'learned':
    return None
  if eval_len > model_cfg.max_len:
    raise ConfigError(
        f'evaluation length {eval_len} exceeds the learned table of model.max_len='
        f'{model_cfg.max_len}; train with model.max_len >= the longest evaluation length (rows past '
        f'train.seq_len stay untrained, eval.learned_positions={eval_cfg.learned_positions!r})')
  return train_len - 1 if eval_cfg.learned_positions == 'clamp' else None


class Evaluator:
  """Evaluates one trained model; evaluations whose model configs coincide are computed once.

  A training-only attention pattern (LongLoRA's S²-Attn) is evaluated as full causal attention.
  ``model_fn`` builds the model of a ModelConfig (default TransformerLM; lcr.peft.for_evaluation
  gives the one of an adapter run).
  """

  def __init__(self, params: Any, model_cfg: ModelConfig, eval_cfg: EvalConfig, train_len: int,
               model_fn: Callable[[ModelConfig], Any] = TransformerLM):
    if model_cfg.attention in TRAINING_ONLY_ATTENTION:
      model_cfg = dataclasses.replace(model_cfg, attention='causal')
    self.params, self.model_cfg, self.eval_cfg, self.train_len = params, model_cfg, eval_cfg, train_len
    self.model_fn = model_fn
    self._compiled: dict[ModelConfig, Callable] = {}
    self._done: dict[tuple, Scores] = {}

  def config(self, scaling: str, eval_len: int) -> ModelConfig:
    return scaled_config(self.model_cfg, scaling, eval_len, self.train_len, self.eval_cfg.rope_factor)

  def apply_fn(self, cfg: ModelConfig) -> ApplyFn:
    model = self.model_fn(cfg)
    return lambda tokens, positions, segments: model.apply(
        {'params': self.params}, tokens, positions, segments)

  def perplexity(self, task: Task, stream: Stream, byte_lengths: np.ndarray | None) -> Scores:
    cfg = self.config(task.rope_scaling, task.eval_len)
    key = (cfg, task.protocol, task.eval_len, task.stride)
    if key not in self._done:
      if cfg not in self._compiled:
        self._compiled[cfg] = nll_fn(self.apply_fn(cfg))
      ec = self.eval_cfg
      self._done[key] = score_stream(
          self.apply_fn(cfg), stream, eval_len=task.eval_len, protocol=task.protocol,
          stride=task.stride, max_tokens=ec.max_tokens, batch_size=ec.batch_size,
          train_len=self.train_len, byte_lengths=byte_lengths,
          attend_across_documents=ec.attend_across_documents,
          max_position=learned_position_limit(self.model_cfg, ec, self.train_len, task.eval_len),
          jitted=self._compiled[cfg])
    return self._done[key]

  def passkey(self, scaling: str, length: int, tokenizer: Any, bos_id: int | None = None,
              mode: str = 'teacher_forced') -> list[dict[str, Any]]:
    """Passkey records (one per depth) at context ``length`` under RoPE ``scaling``.

    ``mode='generate'`` generates the key with the KV cache at the true positions (a learned table
    is read past L: the study sizes it to the longest length).
    """
    ec = self.eval_cfg
    cfg = self.config(scaling, length)
    common = dict(length=length, depths=ec.passkey_depths, trials=ec.passkey_trials,
                  fmt=ec.passkey_format, bos_id=bos_id,
                  batch_size=windows_per_batch(ec.batch_size, self.train_len, length))
    if mode == 'generate':
      return passkey_lib.passkey_generation_accuracy(self.params, cfg, tokenizer, **common)
    return passkey_lib.passkey_accuracy(
        self.apply_fn(cfg), tokenizer,
        max_position=learned_position_limit(self.model_cfg, ec, self.train_len, length), **common)

  def task_fields(self, task: Task) -> dict[str, Any]:
    """The fields of a results.jsonl row that describe ``task`` (without the study's labels)."""
    cfg = self.config(task.rope_scaling, task.eval_len)
    return dict(
        pos=self.model_cfg.pos, rope_scaling=task.rope_scaling, rope_factor=effective_factor(cfg),
        protocol=task.protocol, stride=task.stride, train_len=self.train_len,
        eval_len=task.eval_len,
        learned_positions=self.eval_cfg.learned_positions if self.model_cfg.pos == 'learned' else None)


def score_fields(scores: Scores) -> dict[str, Any]:
  """The measured fields of a results.jsonl row."""
  return dict(loss=scores.loss, ppl=scores.ppl, bpb=scores.bpb, tokens=scores.tokens,
              bytes=scores.bytes)
