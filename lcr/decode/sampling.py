"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus).

The warpers apply in Hugging Face ``generate``'s order: temperature → top-k → top-p → sample.

* Temperature τ divides the logits (τ → 0 approaches greedy; τ = 1 leaves them).
* Top-k keeps the k highest logits. Ties at the cutoff are all kept: every token whose logit
  equals the k-th largest survives (as in Hugging Face's TopKLogitsWarper), so a tie can keep
  more than k tokens, and the result never depends on token order.
* Top-p (Holtzman et al. 2020, §3.1, eq. 2) keeps the nucleus: the smallest set of most probable
  tokens whose probability mass reaches p. Walking tokens from most to least probable, a token is
  kept while the mass before it is below p (with 1e-6 of float32 slack, so a mass equal to p up to
  rounding ends the nucleus exactly there); tokens tied with the least probable kept token are kept
  too. p = 1 keeps every token.
* ``min_tokens_to_keep`` ≥ 1 raises k to at least that and keeps at least that many tokens in the
  nucleus.

Randomness is per row and per position: the key of row b at position t is
fold_in(fold_in(key(seed), b), t), so a row's text depends neither on the rest of the batch nor on
how the batch is sharded over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUCLEUS_SLACK = 1e-6


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
  return logits if temperature == 1.0 else logits / temperature


def keep_top_k(logits_BxV: jax.Array, k: int, min_tokens_to_keep: int = 1) -> jax.Array:
  """Logits outside the top k (ties at the cutoff kept) set to −inf; k ≤ 0 or ≥ V: unchanged."""
  vocab = logits_BxV.shape[-1]
  if k <= 0:
    return logits_BxV
  k = max(k, min_tokens_to_keep)
  if k >= vocab:
    return logits_BxV
  kth = jax.lax.top_k(logits_BxV, k)[0][..., -1:]
  return jnp.where(logits_BxV >= kth, logits_BxV, -jnp.inf)


def keep_top_p(logits_BxV: jax.Array, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
  """Logits outside the nucleus of mass p set to −inf (see the module docstring for ties)."""
  if p >= 1.0:
    return logits_BxV
  probs = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
  sorted_probs = -jnp.sort(-probs, axis=-1)                           # descending
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  rank = jnp.arange(sorted_probs.shape[-1]).reshape((1,) * (probs.ndim - 1) + (-1,))
  kept = (mass_before < p - NUCLEUS_SLACK) | (rank < min_tokens_to_keep)
  threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(probs >= threshold, logits_BxV, -jnp.inf)


def warp(logits_BxV: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         min_tokens_to_keep: int = 1) -> jax.Array:
  """temperature → top-k → top-p, in float32; removed tokens get −inf."""
  logits = apply_temperature(logits_BxV.astype(jnp.float32), temperature)
  logits = keep_top_k(logits, top_k, min_tokens_to_keep)
  return keep_top_p(logits, top_p, min_tokens_to_keep)


def row_keys(seed: int, rows_B: jax.Array, positions_B: jax.Array) -> jax.Array:
  """[B] keys: fold_in(fold_in(key(seed), row), position)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(base, r), t))(rows_B, positions_B)


def sample(logits_BxV: jax.Array, keys_B: jax.Array) -> jax.Array:
  """[B] int32 tokens drawn from softmax(logits) of each row with its own key."""
  return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


def greedy(logits_BxV: jax.Array) -> jax.Array:
  """[B] int32 argmax (the lowest token id among equal maxima)."""
  return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
