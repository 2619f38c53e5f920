"""Token cross-entropy shared by training and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """[B, T] negative log-likelihood of each target token, in float32.

  -log softmax(z)_y = logsumexp(z) - z_y; z_y is read with a one-hot contraction rather than a
  gather, so a vocabulary sharded over devices is reduced in place instead of gathered.
  """
  logits = logits_BxTxV.astype(jnp.float32)
  one_hot = jax.nn.one_hot(targets_BxT, logits.shape[-1], dtype=logits.dtype)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.einsum('btv,btv->bt', logits, one_hot)


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                  weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token losses, sum of weights); weight 0 marks padding, which costs nothing.

  Return sums, not a mean, so that batches, hosts and evaluation windows combine exactly:
  mean loss = Σ sum_loss / Σ sum_weights.
  """
  weights = weights_BxT.astype(jnp.float32)
  nll = token_nll(logits_BxTxV, targets_BxT)
  return jnp.sum(jnp.where(weights > 0, nll * weights, 0.0)), jnp.sum(weights)
