"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", §4.2 and appendix prompt).

A 5-digit key hidden at a controlled depth in repeated filler text; after the filler the model is
asked for it. Two scorings: teacher-forced (an example is correct when every answer token is the
model's argmax given the correct prefix; for byte-level tokens, five digit checks) and by
generation (the key greedily generated with the KV cache must equal it exactly); neither samples. ``mix_passkey`` replaces a fraction of training rows with such examples at the training
length, so a small model learns the task there and "test long" measures extrapolation rather than
ignorance of the task.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (tokens, positions, segments)


class Tokenizer(Protocol):
  def encode(self, text: str) -> Sequence[int]: ...


@dataclasses.dataclass(frozen=True)
class PasskeyFormat:
  """The prompt's parts; ``needle`` holds ``{key}``; the answer is the key's digits after ``question``."""
  intro: str
  filler: str
  needle: str
  question: str


_FILLER = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. '
FORMATS: dict[str, PasskeyFormat] = {
    # The prompt of Mohtashami & Jaggi 2023 (appendix), as in their passkey_retrieval script.
    'mj': PasskeyFormat(
        intro=('There is an important info hidden inside a lot of irrelevant text. Find it and '
               'memorize them. I will quiz you about the important information there. '),
        filler=_FILLER,
        needle='The pass key is {key}. Remember it. {key} is the pass key. ',
        question='What is the pass key? The pass key is '),
    # The same task in 43 bytes of prompt, for models trained on contexts of 64 bytes.
    'compact': PasskeyFormat(intro='', filler=_FILLER, needle='The pass key is {key}. ',
                             question='The pass key is '),
}


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
  tokens: np.ndarray        # [length] int32: prompt then answer
  answer_start: int         # index of the first answer token
  key: int
  depth: float


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
  return np.asarray(list(tokenizer.encode(text)), np.int32).reshape(-1)


def make_example(tokenizer: Tokenizer, length: int, depth: float, key: int, fmt: str = 'mj',
                 bos_id: int | None = None, filler_offset: int = 0) -> PasskeyExample:
  """A prompt of exactly ``length`` tokens with ``key`` after a fraction ``depth`` of the filler.

  depth 0 puts the needle first (farthest from the question), depth 1 right before the question.
  Filler is the repeated filler text cut to the tokens left over, starting ``filler_offset``
  tokens into it; ``bos_id`` starts the row.
  """
  if not 10_000 <= key <= 99_999:
    raise ValueError(f'the pass key must have 5 digits, got {key}')
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f'depth must be in [0, 1], got {depth}')
  f = FORMATS[fmt]
  head = ([np.asarray([bos_id], np.int32)] if bos_id is not None else []) + [_encode(tokenizer, f.intro)]
  needle = _encode(tokenizer, f.needle.format(key=key))
  tail = [_encode(tokenizer, f.question), _encode(tokenizer, str(key))]
  fixed = sum(map(len, head + tail)) + len(needle)
  n_fill = length - fixed
  if n_fill < 0:
    raise ValueError(f'a {fmt!r} passkey prompt needs at least {fixed} tokens, asked for {length}')
  unit = _encode(tokenizer, f.filler)
  start = filler_offset % len(unit)
  filler = np.tile(unit, -(-(start + n_fill) // len(unit)))[start:start + n_fill]
  cut = int(round(depth * n_fill))
  tokens = np.concatenate(head + [filler[:cut], needle, filler[cut:]] + tail)
  return PasskeyExample(tokens, length - len(tail[1]), key, depth)


def make_examples(tokenizer: Tokenizer, length: int, depths: Iterable[float], trials: int,
                  seed: int = 0, fmt: str = 'mj', bos_id: int | None = None) -> list[PasskeyExample]:
  """``trials`` examples per depth with random keys; the same seed gives every model the same keys."""
  out = []
  for i, depth in enumerate(depths):
    rng = np.random.default_rng([seed, length, i])
    out += [make_example(tokenizer, length, float(depth), int(k), fmt, bos_id)
            for k in rng.integers(10_000, 100_000, size=trials)]
  return out


def answer_mask(examples: Sequence[PasskeyExample]) -> np.ndarray:
  """[n, length − 1] bool over targets (target j is token j + 1): the answer tokens."""
  length = len(examples[0].tokens)
  j = np.arange(length - 1)
  starts = np.asarray([e.answer_start for e in examples])
  return j[None, :] + 1 >= starts[:, None]


def _argmax_fn(apply_fn: ApplyFn, max_position: int | None) -> Callable[..., tuple[jax.Array, jax.Array]]:
  def fn(tokens_BxT, targets_BxT1, mask_BxT1):
    positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
    if max_position is not None:
      positions = jnp.minimum(positions, max_position)
    logits = apply_fn(tokens_BxT, positions, jnp.ones_like(tokens_BxT))
    hit = jnp.argmax(logits[:, :-1], axis=-1) == targets_BxT1
    all_hit = jnp.all(jnp.where(mask_BxT1, hit, True), axis=-1)
    digit_hits = jnp.sum(jnp.where(mask_BxT1, hit, False), axis=-1)
    return all_hit, digit_hits
  return jax.jit(fn)


def score_examples(apply_fn: ApplyFn, examples: Sequence[PasskeyExample], *, batch_size: int = 8,
                   max_position: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Teacher-forced scoring → (correct [n] bool: every answer token ranked first, digit hits [n]).

  ``batch_size`` examples go through each forward pass; ``max_position`` clamps positions (the
  explicit policy for a learned table past its trained rows).
  """
  length = len(examples[0].tokens)
  if any(len(e.tokens) != length for e in examples):
    raise ValueError('score examples of one length at a time')
  return score_tokens(apply_fn, np.stack([e.tokens for e in examples]), answer_mask(examples),
                      batch_size=batch_size, max_position=max_position)


def score_tokens(apply_fn: ApplyFn, tokens: np.ndarray, mask: np.ndarray, *,
                 targets: np.ndarray | None = None, batch_size: int = 8,
                 max_position: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Teacher-forced scoring of rows tokens [n, L] at the targets mask [n, L − 1] marks → (correct
  [n] bool: every marked target is the argmax, hits [n]: how many are). Target j is what the model
  should predict after token j: ``targets`` [n, L − 1], by default the next token, tokens[:, 1:].
  """
  n, batch = len(tokens), batch_size
  targets = tokens[:, 1:] if targets is None else targets
  pad = -n % batch
  tokens, targets, mask = (np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
                           for x in (tokens, targets, mask))
  fn = _argmax_fn(apply_fn, max_position)
  outs = [fn(tokens[i:i + batch], targets[i:i + batch], mask[i:i + batch])
          for i in range(0, len(tokens), batch)]
  correct = np.concatenate([np.asarray(o[0]) for o in outs])[:n]
  hits = np.concatenate([np.asarray(o[1]) for o in outs])[:n]
  return correct, hits


def generate_keys(params: Any, model_cfg: Any, examples: Sequence[PasskeyExample], *,
                  batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Retrieval by generation → (correct [n]: the greedily generated answer equals the key's
  tokens exactly, answer tokens matched position by position [n]).

  Each prompt is the example up to its answer; greedy decoding with the KV cache (lcr.decode)
  produces exactly as many tokens as the answer has.
  """
  from lcr.config import DecodeConfig
  from lcr.decode import engine   # decoding is only needed for this mode
  answer_len = len(examples[0].tokens) - examples[0].answer_start
  decode = DecodeConfig(strategy='greedy', max_new_tokens=answer_len)
  correct, digits = [], []
  for i in range(0, len(examples), batch_size):
    batch = examples[i:i + batch_size]
    out = engine.generate(params, model_cfg, decode, [e.tokens[:e.answer_start] for e in batch])
    answers = np.stack([e.tokens[e.answer_start:] for e in batch])
    hits = out.tokens[:, :answer_len] == answers
    correct.append(np.all(hits, axis=1))
    digits.append(np.sum(hits, axis=1))
  return np.concatenate(correct), np.concatenate(digits)


def accuracy_records(examples: Sequence[PasskeyExample], depths: Sequence[float], trials: int,
                     correct: np.ndarray, digits: np.ndarray) -> list[dict[str, Any]]:
  """One record per depth: depth, trials, correct, accuracy, digit_accuracy."""
  answer_len = len(examples[0].tokens) - examples[0].answer_start
  out = []
  for i, depth in enumerate(depths):
    c, d = correct[i * trials:(i + 1) * trials], digits[i * trials:(i + 1) * trials]
    out.append(dict(depth=float(depth), trials=trials, correct=int(c.sum()),
                    accuracy=float(c.mean()), digit_accuracy=float(d.sum() / (answer_len * trials))))
  return out


def passkey_accuracy(apply_fn: ApplyFn, tokenizer: Tokenizer, *, length: int,
                     depths: Sequence[float], trials: int, seed: int = 0, fmt: str = 'mj',
                     bos_id: int | None = None, batch_size: int = 8,
                     max_position: int | None = None) -> list[dict[str, Any]]:
  """Teacher-forced records, one per depth (see :func:`accuracy_records`)."""
  examples = make_examples(tokenizer, length, depths, trials, seed, fmt, bos_id)
  correct, digits = score_examples(apply_fn, examples, batch_size=batch_size,
                                   max_position=max_position)
  return accuracy_records(examples, depths, trials, correct, digits)


def passkey_generation_accuracy(params: Any, model_cfg: Any, tokenizer: Tokenizer, *, length: int,
                                depths: Sequence[float], trials: int, seed: int = 0,
                                fmt: str = 'mj', bos_id: int | None = None,
                                batch_size: int = 8) -> list[dict[str, Any]]:
  """Records by generation, one per depth, on the same examples as :func:`passkey_accuracy`."""
  examples = make_examples(tokenizer, length, depths, trials, seed, fmt, bos_id)
  correct, digits = generate_keys(params, model_cfg, examples, batch_size=batch_size)
  return accuracy_records(examples, depths, trials, correct, digits)


def mix_passkey(tokens_BxT: np.ndarray, rng: np.random.Generator, fraction: float,
                tokenizer: Tokenizer, fmt: str = 'compact',
                bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Replaces each row with a passkey example (random key and depth) with probability ``fraction``.

  Returns (tokens, replaced [B] bool); a replaced row is one document that fills the whole row.
  """
  tokens = np.array(tokens_BxT, copy=True)
  replaced = rng.random(len(tokens)) < fraction
  for row in np.flatnonzero(replaced):
    example = make_example(tokenizer, tokens.shape[1], float(rng.random()),
                           int(rng.integers(10_000, 100_000)), fmt, bos_id)
    tokens[row] = example.tokens
  return tokens, replaced


def mix_passkey_batch(batch: dict[str, np.ndarray], rng: np.random.Generator, fraction: float,
                      tokenizer: Tokenizer, fmt: str = 'compact',
                      bos_id: int | None = None) -> dict[str, np.ndarray]:
  """``mix_passkey`` on a training batch {inputs, targets, positions, segment_ids, weights} [B, T].

  A replaced row holds one example of T + 1 tokens (inputs = its first T, targets = its last T),
  positions 0..T−1, one segment and weight 1 on every target.
  """
  rows = np.concatenate([batch['inputs'], batch['targets'][:, -1:]], axis=1)
  rows, replaced = mix_passkey(rows, rng, fraction, tokenizer, fmt, bos_id)
  out = dict(batch)
  t = batch['inputs'].shape[1]
  out['inputs'] = np.where(replaced[:, None], rows[:, :-1], batch['inputs']).astype(batch['inputs'].dtype)
  out['targets'] = np.where(replaced[:, None], rows[:, 1:], batch['targets']).astype(batch['targets'].dtype)
  fills = {'positions': np.arange(t), 'segment_ids': 1, 'weights': 1}
  for name, value in fills.items():
    if name in batch:
      out[name] = np.where(replaced[:, None], value, batch[name]).astype(batch[name].dtype)
  return out


class PasskeyMix:
  """A training iterator whose batches carry passkey rows (``mix_passkey_batch``).

  Which rows are replaced, and by what, is drawn from a generator seeded with the batch's own
  tokens and ``seed``, so the wrapper has no state: it checkpoints and resumes through the wrapped
  iterator's ``get_state``/``set_state`` and a resumed run sees exactly the same batches.
  """

  def __init__(self, iterator, tokenizer: Tokenizer, fraction: float, *, fmt: str = 'compact',
               bos_id: int | None = None, seed: int = 0):
    self.iterator, self.tokenizer, self.fraction = iterator, tokenizer, fraction
    self.fmt, self.bos_id, self.seed = fmt, bos_id, seed

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.iterator)
    digest = np.frombuffer(hashlib.sha256(np.ascontiguousarray(batch['inputs']).tobytes()).digest(),
                           np.uint32)
    rng = np.random.default_rng([self.seed, *digest.tolist()])
    return mix_passkey_batch(batch, rng, self.fraction, self.tokenizer, self.fmt, self.bos_id)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state) -> None:
    self.iterator.set_state(state)

  def __getattr__(self, name):   # e.g. start_prefetch, close
    return getattr(self.iterator, name)
