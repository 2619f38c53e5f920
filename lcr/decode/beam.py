"""Beam search (n beams per prompt) with the GNMT length penalty; returns the n best hypotheses.

A hypothesis Y is scored by log P(Y | prompt) / lp(|Y|) with lp(|Y|) = ((5 + |Y|) / 6)^α (Wu et al.
2016, eq. 14; |Y| counts the generated tokens, EOS included). Every step expands each live beam by
every token and keeps the 2n best candidates by log-probability: those ending in EOS join the
finished hypotheses (the n best are kept), the n best others continue. A hypothesis that reaches
``max_new_tokens`` is finished as it is.

A row stops early once n hypotheses are finished and none of its live beams can still beat the
worst of them. Log-probabilities are ≤ 0, so a live beam with log-probability s at length L can at
best keep s, reaching s / lp(L') for some L' in (L, max_new_tokens]: the bound is
max(s / lp(L + 1), s / lp(max_new_tokens)) whatever the sign of α. The search is thus exact up to
the beam width: with n at least the number of hypotheses per step it finds the best hypothesis that
exhaustive enumeration finds.

Prompts of different lengths share a batch as in ``engine``: while a row's prompt lasts, all its
beams take the prompt token at no cost (only beam 0 is live until then).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcr.config import DecodeConfig, MeshConfig, ModelConfig
from lcr.decode import engine

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Beams:
  """The n best hypotheses per prompt, best first: tokens [B, n, N], lengths [B, n], scores [B, n]
  (length-penalised log-probabilities) and log_probs [B, n] (without the penalty)."""
  tokens: np.ndarray
  lengths: np.ndarray
  scores: np.ndarray
  log_probs: np.ndarray

  def best(self, b: int) -> np.ndarray:
    return self.tokens[b, 0, :self.lengths[b, 0]]


def length_penalty(length, alpha: float):
  """GNMT lp(|Y|) = ((5 + |Y|) / 6)^α."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _reorder(state: Any, flat_parents: jax.Array) -> Any:
  """Gathers every cache array (or the token buffer) along its batch axis."""
  def take(leaf):
    if isinstance(leaf, nn.Partitioned):
      axis = leaf.names.index('batch')
      return leaf.replace_boxed(jnp.take(leaf.value, flat_parents, axis=axis))
    return jnp.take(leaf, flat_parents, axis=0)
  return jax.tree.map(take, state, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _repeat(state: Any, n: int) -> Any:
  """Each row of every cache array (or of the token buffer) repeated n times, for n beams."""
  def rep(leaf):
    if isinstance(leaf, nn.Partitioned):
      return leaf.replace_boxed(jnp.repeat(leaf.value, n, axis=leaf.names.index('batch')))
    return jnp.repeat(leaf, n, axis=0)
  return jax.tree.map(rep, state, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass
class _Search:
  state: Any
  pos: jax.Array          # [B] position of the tokens to feed next
  tok: jax.Array          # [B, n]
  seqs: jax.Array         # [B, n, N]
  raw: jax.Array          # [B, n] log-probability of each live beam
  fin_seqs: jax.Array     # [B, n, N]
  fin_len: jax.Array      # [B, n]
  fin_score: jax.Array    # [B, n] length-penalised; −inf = empty
  fin_raw: jax.Array      # [B, n]
  done: jax.Array         # [B]
  steps: jax.Array


jax.tree_util.register_dataclass(
    _Search, data_fields=[f.name for f in dataclasses.fields(_Search)], meta_fields=[])


def _candidates(search: _Search, logits_BnxV, prompt, lengths, n: int):
  """(raw scores [B, 2n], parents [B, 2n], tokens [B, 2n], pos [B], forced [B])."""
  b = prompt.shape[0]
  vocab = logits_BnxV.shape[-1]
  pos = search.pos + 1
  forced = pos < lengths
  logp = jax.nn.log_softmax(logits_BnxV.astype(jnp.float32), axis=-1).reshape(b, n, vocab)
  prompt_tok = jnp.take_along_axis(prompt, jnp.minimum(pos, prompt.shape[1] - 1)[:, None], 1)[:, 0]
  one_hot = jnp.where(jnp.arange(vocab)[None, None] == prompt_tok[:, None, None], 0.0, NEG_INF)
  logp = jnp.where(forced[:, None, None], one_hot, logp)
  total = (search.raw[:, :, None] + logp).reshape(b, n * vocab)
  raw, flat = jax.lax.top_k(total, 2 * n)
  return raw, flat // vocab, (flat % vocab).astype(jnp.int32), pos, forced


def _step(search: _Search, logits, prompt, lengths, *, n: int, max_new: int, alpha: float, eos_id):
  """One beam step from the logits of every live beam's next token."""
  b = prompt.shape[0]
  raw, parents, tokens, pos, forced = _candidates(search, logits, prompt, lengths, n)
  live_row = ~search.done
  gen_len = pos - lengths + 1                         # generated tokens after this one
  is_eos = (tokens == eos_id) if eos_id is not None else jnp.zeros_like(tokens, bool)
  is_eos &= ~forced[:, None]
  last = (gen_len >= max_new) & ~forced               # every hypothesis ends here
  parent_seqs = jnp.take_along_axis(search.seqs, parents[:, :, None], axis=1)
  slot = jnp.arange(max_new)[None, None] == (gen_len - 1)[:, None, None]
  cand_seqs = jnp.where(slot & ~forced[:, None, None], tokens[:, :, None], parent_seqs)
  # Candidates that finish: EOS ones, or (at the last step) the n best of all.
  finishing = (is_eos | (last[:, None] & (jnp.arange(2 * n) < n)[None])) & live_row[:, None]
  finishing &= raw > NEG_INF
  cand_score = jnp.where(finishing, raw / length_penalty(gen_len, alpha)[:, None], NEG_INF)
  pool_score = jnp.concatenate([search.fin_score, cand_score], axis=1)
  keep_score, keep = jax.lax.top_k(pool_score, n)
  pick = lambda old, new: jnp.take_along_axis(jnp.concatenate([old, new], axis=1),
                                              keep.reshape(keep.shape + (1,) * (old.ndim - 2)), 1)
  fin_seqs = pick(search.fin_seqs, cand_seqs)
  fin_len = pick(search.fin_len, jnp.broadcast_to(gen_len[:, None], raw.shape))
  fin_raw = pick(search.fin_raw, raw)
  # The n best candidates that do not end continue (at most n of the 2n end in EOS).
  cont_raw = jnp.where(is_eos, NEG_INF, raw)
  next_raw, order = jax.lax.top_k(cont_raw, n)
  next_parents = jnp.take_along_axis(parents, order, 1)
  next_tokens = jnp.take_along_axis(tokens, order, 1)
  next_seqs = jnp.take_along_axis(cand_seqs, order[:, :, None], 1)
  flat_parents = (jnp.arange(b)[:, None] * n + next_parents).reshape(-1)
  state = _reorder(search.state, flat_parents)
  best_live = jnp.max(jnp.maximum(next_raw / length_penalty(gen_len + 1, alpha)[:, None],
                                  next_raw / length_penalty(max_new, alpha)), axis=1)
  full = jnp.all(keep_score > NEG_INF, axis=1)
  ended = ~forced & (last | (full & (jnp.min(keep_score, axis=1) >= best_live)))
  where = lambda new, old: jnp.where(live_row.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
  return _Search(
      state, jnp.where(live_row, pos, search.pos), where(next_tokens, search.tok),
      where(next_seqs, search.seqs), where(next_raw, search.raw), where(fin_seqs, search.fin_seqs),
      where(fin_len, search.fin_len), where(keep_score, search.fin_score),
      where(fin_raw, search.fin_raw), search.done | ended, search.steps + 1)


def search_loop(stepper: engine.Stepper, params, prompt_BxP, lengths_B, *, n: int, max_new: int,
                alpha: float, eos_id: int | None):
  """Prefill once per prompt, repeat the cache for n beams, then beam steps until every row ends."""
  b = prompt_BxP.shape[0]
  logits, state = stepper.prefill(params, prompt_BxP, lengths_B)
  start = jnp.minimum(lengths_B, stepper.prefill_len) - 1
  raw0 = jnp.where(jnp.arange(n) == 0, 0.0, NEG_INF)[None].repeat(b, 0)
  zeros = jnp.zeros((b, n, max_new), jnp.int32)
  search = _Search(_repeat(state, n), start, jnp.zeros((b, n), jnp.int32), zeros, raw0, zeros,
                   jnp.zeros((b, n), jnp.int32), jnp.full((b, n), NEG_INF), jnp.full((b, n), NEG_INF),
                   jnp.zeros((b,), bool), jnp.zeros((), jnp.int32))
  step = functools.partial(_step, prompt=prompt_BxP, lengths=lengths_B, n=n, max_new=max_new,
                           alpha=alpha, eos_id=eos_id)
  search = step(search, jnp.repeat(logits, n, axis=0))
  limit = prompt_BxP.shape[1] - stepper.prefill_len + max_new

  def body(s: _Search) -> _Search:
    logits, state = stepper.step(params, s.state, s.tok.reshape(-1), jnp.repeat(s.pos, n))
    return step(dataclasses.replace(s, state=state), logits)

  search = jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.steps <= limit), body, search)
  return search.fin_seqs, search.fin_len, search.fin_score, search.fin_raw


def beam_search(params: Any, model_cfg: ModelConfig, decode: DecodeConfig, prompts, *,
                eos_id: int | None = None, mesh: jax.sharding.Mesh | None = None,
                mesh_cfg: MeshConfig | None = None) -> Beams:
  """The ``decode.num_beams`` best continuations of each prompt under the GNMT length penalty."""
  prompt, lengths = engine.pad_prompts(prompts)
  stepper = engine.Stepper(model_cfg, decode, prompt.shape[1])
  engine.check_servable(stepper.cfg, stepper.layout, int(lengths.max()), decode.max_new_tokens)
  run = functools.partial(search_loop, stepper, n=decode.num_beams, max_new=decode.max_new_tokens,
                          alpha=decode.length_penalty, eos_id=eos_id)
  seqs, lens, scores, raw = engine.compiled(run, mesh, mesh_cfg, stepper.cfg)(params, prompt, lengths)
  return Beams(np.asarray(seqs), np.asarray(lens), np.asarray(scores), np.asarray(raw))
