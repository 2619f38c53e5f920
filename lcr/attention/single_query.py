"""Attention of one query per row over a KV cache stored heads first, plus its own key: a decoding
step.

softmax(q·kᵀ/√d + bias) v (Vaswani et al. 2017 eq. 1) for q [B, H, D] over the cached keys and
values [B, K, C, D] (K divides H, so GQA/MQA read each cached head once) and the query's own key
and value [B, K, D]. With the heads ahead of the cache length both products are batched
matrix-vector products over (B, K) that read the cache where it lies, and the new key joins at the
level of the logits: the step reads the cache before the caller writes the new key into it, so the
write happens in place, and a step costs what its visible keys cost, not a copy of the cache.
Float32 logits and softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcr.attention.dense import MASK_VALUE
from lcr.attention.masks import MaskSpec
from lcr.positional import BiasFn


def attention(q_BxHxD: jax.Array, k_BxKxCxD: jax.Array, v_BxKxCxD: jax.Array, k_new_BxKxD: jax.Array,
              v_new_BxKxD: jax.Array, *, q_pos_B: jax.Array, k_pos_BxC: jax.Array,
              k_valid_BxC: jax.Array, mask: MaskSpec, bias_fn: BiasFn | None = None,
              scale: float | None = None, logit_factor_B: jax.Array | None = None) -> jax.Array:
  """[B, H, D] outputs.

  ``k_valid`` marks cache slots that hold a key this step may use (the slot the new key will
  overwrite must not be valid unless the mask rules it out); ``mask`` is evaluated on the true
  positions; the new key sits at the query's own position and is always visible;
  ``bias_fn(q_pos [B,1], k_pos [B,S]) → [B|1, H, 1, S]``; ``logit_factor`` [B] multiplies q·k.
  """
  b, h, d = q_BxHxD.shape
  kv, c = k_BxKxCxD.shape[1], k_BxKxCxD.shape[2]
  g = h // kv
  scale = d ** -0.5 if scale is None else scale
  q = q_BxHxD.reshape(b, kv, g, d)
  cached = jnp.einsum('bkgd,bkcd->bkgc', q, k_BxKxCxD, preferred_element_type=jnp.float32)
  own = jnp.einsum('bkgd,bkd->bkg', q, k_new_BxKxD, preferred_element_type=jnp.float32)[..., None]
  logits = jnp.concatenate([cached, own], axis=-1) * scale            # [B, K, G, C + 1]
  if logit_factor_B is not None:
    logits = logits * logit_factor_B[:, None, None, None]
  q_pos = q_pos_B[:, None]
  if bias_fn is not None:
    bias = bias_fn(q_pos, jnp.concatenate([k_pos_BxC, q_pos], axis=1)).astype(jnp.float32)
    logits = logits + bias.reshape(bias.shape[0], kv, g, c + 1)
  visible = mask.visible(q_pos, k_pos_BxC, kv_len=c + 1)[:, 0] & k_valid_BxC     # [B, C]
  visible = jnp.concatenate([visible, jnp.ones((b, 1), bool)], axis=1)
  probs = jax.nn.softmax(jnp.where(visible[:, None, None], logits, MASK_VALUE), axis=-1)
  probs = probs.astype(v_BxKxCxD.dtype)
  out = (jnp.einsum('bkgc,bkcd->bkgd', probs[..., :c], v_BxKxCxD)
         + probs[..., c:] * v_new_BxKxD[:, :, None, :])
  return out.reshape(b, h, d)
