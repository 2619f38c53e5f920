"""Decoding test sets and scoring them: exact match, token accuracy and BLEU per test length.

Generation goes through lcr.decode's loops (``engine.decode_loop`` for greedy and sampling,
``beam.search_loop`` for beam search) with the arch's stepper: the KV cache for the decoder's
self-attention and, for the encoder-decoder, the cross-attention keys and values computed once
per input. Each strategy compiles once for all test lengths (see ``Generator``).

* ``exact_match``: the output up to EOS equals the target.
* ``token_accuracy``: the fraction of target positions i whose output symbol i is the target's
  (a missing symbol is wrong), averaged over examples.
* ``bleu``: sacrebleu corpus BLEU of the outputs against the targets (lcr.seq2seq.bleu).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcr.config import Config
from lcr.decode import beam, engine, sampling
from lcr.seq2seq import bleu, tasks

RESULT_FIELDS = ('task', 'arch', 'pos', 'tip', 'decode', 'train_len', 'test_len', 'exact_match',
                 'token_accuracy', 'bleu', 'examples', 'seed', 'variant')


class Generator:
  """Batches of sources → generated token ids (up to and including EOS).

  Sources of up to ``source_len`` symbols and prefixes of up to ``prefix_len`` tokens are padded to
  those sizes and every call generates up to ``max_new`` tokens (a batch stops when every row has
  ended), so one compilation per strategy serves every test length.
  """

  def __init__(self, arch, config: Config, *, source_len: int, max_new: int, prefix_len: int = 0):
    self.arch, self.config = arch, config
    self.source_len, self.max_new, self.prefix_len = source_len, max_new, prefix_len
    self._compiled: dict[str, Any] = {}

  @classmethod
  def for_lengths(cls, arch, config: Config, lengths) -> 'Generator':
    task = tasks.REGISTRY[config.seq2seq.task.name]
    longest = max(lengths)
    return cls(arch, config, source_len=task.max_source(longest), max_new=task.max_target(longest) + 1)

  def _fn(self, strategy: str):
    if strategy not in self._compiled:
      decode = dataclasses.replace(self.config.decode, strategy=strategy, max_new_tokens=self.max_new)
      stepper = self.arch.stepper(decode, self.arch.prompt_width(self.source_len, self.prefix_len))
      self._compiled[strategy] = jax.jit(functools.partial(_generate, stepper, decode, self.max_new))
    return self._compiled[strategy]

  def __call__(self, params, sources: Sequence[np.ndarray], strategy: str, *,
               prefixes: Sequence[np.ndarray] | None = None, seed: int = 0) -> list[np.ndarray]:
    carry, prompt, lengths = self.arch.prompts(params, sources, prefixes, self.source_len,
                                               self.prefix_len)
    tokens, counts = self._fn(strategy)(carry, jnp.asarray(prompt), jnp.asarray(lengths),
                                        jax.random.key(seed))
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    return [tokens[b, :counts[b]] for b in range(len(sources))]


def _generate(stepper, decode, max_new, carry, prompt, lengths, key):
  if decode.strategy == 'beam':
    seqs, lens, _, _ = beam.search_loop(stepper, carry, prompt, lengths, n=decode.num_beams,
                                        max_new=max_new, alpha=decode.length_penalty,
                                        eos_id=tasks.EOS_ID)
    return seqs[:, 0], lens[:, 0]
  if decode.strategy == 'greedy':
    choose = lambda logits, rows, positions: sampling.greedy(logits)
  else:
    def choose(logits, rows, positions):
      warped = sampling.warp(logits, temperature=decode.temperature, top_k=decode.top_k,
                             top_p=decode.top_p, min_tokens_to_keep=decode.min_tokens_to_keep)
      keys = jax.vmap(lambda r, p: jax.random.fold_in(jax.random.fold_in(key, r), p))(rows, positions)
      return sampling.sample(warped, keys)
  return engine.decode_loop(stepper, choose, carry, prompt, lengths, max_new=max_new,
                            eos_id=tasks.EOS_ID)


def scores(outputs: Sequence[Sequence[str]], targets: Sequence[Sequence[str]]) -> dict[str, float]:
  exact = np.mean([list(o) == list(t) for o, t in zip(outputs, targets)])
  accuracy = np.mean([sum(i < len(o) and o[i] == s for i, s in enumerate(t)) / max(len(t), 1)
                      for o, t in zip(outputs, targets)])
  return {'exact_match': float(exact), 'token_accuracy': float(accuracy),
          'bleu': bleu.corpus_bleu(outputs, targets)}


def evaluate(generator: Generator, params, config: Config, strategy: str, length: int,
             ) -> dict[str, float]:
  """Scores of ``strategy`` on the test set at ``length`` (batches of ``seq2seq.eval_batch``)."""
  s = config.seq2seq
  examples = tasks.test_set(s.task, length)
  outputs = []
  for start in range(0, len(examples), s.eval_batch):
    chunk = examples[start:start + s.eval_batch]
    padded = chunk + [chunk[0]] * (min(s.eval_batch, len(examples)) - len(chunk))   # one shape
    ids = generator(params, [tasks.encode(src) for src, _ in padded], strategy,
                    seed=config.decode.seed + start)
    outputs += [tasks.decode(x) for x in ids[:len(chunk)]]
  return {**scores(outputs, [tgt for _, tgt in examples]), 'examples': len(examples)}
