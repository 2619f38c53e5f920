"""Alignment functions of the cross-attention tips, as pure array functions.

Shapes: B batch, H heads, T decoder (output) steps, S source positions, A additive energy width.
A *visible* mask [B, T, S] (or [B, S] for one step) says which source positions a query may attend
(its own example's source in a packed row).

* Monotonic attention (Raffel et al. 2017): the probability that step i stops at source j is
  p_ij = σ(e_ij); training uses the expected alignment (eq. 9)
      α_ij = p_ij · q_ij,   q_ij = (1 − p_{i,j−1}) q_{i,j−1} + α_{i−1,j},
  which this module solves in parallel over j in log space (:func:`monotonic_expected_step`):
      q_ij = Σ_{k≤j} α_{i−1,k} Π_{l=k}^{j−1} (1 − p_il) = exp(L_j) Σ_{k≤j} α_{i−1,k} exp(−L_k),
  L_j = Σ_{l<j} log(1 − p_il), so log q_ij = L_j + logcumsumexp_k(log α_{i−1,k} − L_k), with
  log p = log σ(e) and log(1 − p) = log σ(−e) (no clipping). α_0 is a one-hot on the first source
  position. Decoding is hard (Algorithm 1): from the previous attended index on, attend the first j
  with e_ij > 0 (p_ij > 0.5); if none, attend nothing from then on.
* Location-aware attention (Chorowski et al. 2015 eq. 5–9): e_ij = wᵀ tanh(W s_i + V h_j + U f_ij
  + b) with f_i = F * α_{i−1} (k filters of width r, centred; cross-correlation), α_i = softmax(e_i).
  α_0 is uniform over the source.
* The guided attention weights of Tachibana et al. 2017: W_nt = 1 − exp(−(n/N − t/T)² / (2g²)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e4          # log of a probability that is zero (finite, so gradients stay finite)


def masked_softmax(energy: jax.Array, visible: jax.Array) -> jax.Array:
  """softmax over the last axis restricted to ``visible``; all zeros where nothing is visible."""
  logits = jnp.where(visible, energy.astype(jnp.float32), NEG)
  return jax.nn.softmax(logits, axis=-1) * visible


def first_visible(visible: jax.Array) -> jax.Array:
  """A one-hot (float) on the first visible position of the last axis (zeros if none)."""
  return (visible & (jnp.cumsum(visible, axis=-1) == 1)).astype(jnp.float32)


def uniform_visible(visible: jax.Array) -> jax.Array:
  count = jnp.sum(visible, axis=-1, keepdims=True)
  return visible.astype(jnp.float32) / jnp.maximum(count, 1)


def exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def monotonic_expected_step(log_alpha_prev: jax.Array, energy: jax.Array,
                            visible: jax.Array) -> jax.Array:
  """log α_i [..., S] from log α_{i−1} [..., S] and the energies e_i [..., S] (parallel form).

  Positions outside ``visible`` have p = 0: never chosen, and passed over at no cost.
  """
  energy = energy.astype(jnp.float32)
  log_p = jnp.where(visible, jax.nn.log_sigmoid(energy), NEG)
  log_not_p = jnp.where(visible, jax.nn.log_sigmoid(-energy), 0.0)
  passed = exclusive_cumsum(log_not_p)                        # L_j = Σ_{l<j} log(1 − p_l)
  log_q = passed + jax.lax.cumlogsumexp(log_alpha_prev - passed, axis=log_alpha_prev.ndim - 1)
  return jnp.maximum(log_p + log_q, NEG)


def monotonic_hard_step(alpha_prev: jax.Array, energy: jax.Array, visible: jax.Array) -> jax.Array:
  """Hard monotonic attention (Raffel et al. 2017 Algorithm 1) from the previous one-hot α_{i−1}.

  Attends the first position at or after the previous one whose energy is > 0 (p > 0.5); all
  zeros if there is none, or if the previous step attended nothing.
  """
  chosen = ((energy > 0) & visible).astype(jnp.float32)
  reachable = chosen * jnp.cumsum(alpha_prev, axis=-1)        # at or after the previous index
  return reachable * _exclusive_cumprod(1.0 - reachable)       # keep the first of them


def _exclusive_cumprod(x: jax.Array) -> jax.Array:
  ones = jnp.ones_like(x[..., :1])
  return jnp.cumprod(jnp.concatenate([ones, x[..., :-1]], axis=-1), axis=-1)


def location_features(alpha_BxHxS: jax.Array, kernel_HxKxW: jax.Array) -> jax.Array:
  """f [B, H, K, S]: each head's previous alignment cross-correlated with its K filters of odd
  width W, centred (f[b,h,k,j] = Σ_r F[h,k,r] α[b,h,j + r − (W − 1)/2], zero outside)."""
  heads, filters, width = kernel_HxKxW.shape
  out = jax.lax.conv_general_dilated(
      alpha_BxHxS.astype(jnp.float32), kernel_HxKxW.reshape(heads * filters, 1, width).astype(jnp.float32),
      window_strides=(1,), padding=[((width - 1) // 2, (width - 1) // 2)],
      dimension_numbers=('NCH', 'OIH', 'NCH'), feature_group_count=heads)
  return out.reshape(alpha_BxHxS.shape[0], heads, filters, alpha_BxHxS.shape[-1])


def guided_attention_weights(n_pos, t_pos, n_len, t_len, g: float = 0.2) -> jax.Array:
  """Tachibana et al. 2017 eq. in §4.1: W_nt = 1 − exp(−(n/N − t/T)² / (2g²)), broadcast."""
  d = n_pos / n_len - t_pos / t_len
  return 1.0 - jnp.exp(-(d ** 2) / (2.0 * g * g))


def segment_lengths(segments_BxL: jax.Array) -> jax.Array:
  """[B, L]: the number of tokens of each token's segment (0 at padding)."""
  same = segments_BxL[:, :, None] == segments_BxL[:, None, :]
  return jnp.where(segments_BxL > 0, jnp.sum(same & (segments_BxL[:, None, :] > 0), axis=-1), 0)
