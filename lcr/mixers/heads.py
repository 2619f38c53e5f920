"""Per-head projections named and shaped as lcr.model.Attention's ('query', 'key', 'value', 'out').

Memories (xl, infini) and linear attention use the same parameters as softmax attention, so a
checkpoint's attention weights load into them and tests can compare them with attention directly.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from lcr import layers
from lcr.config import ModelConfig

QUERY_AXES = ('embed', 'heads', 'kv')
KV_AXES = ('embed', 'kv_heads', 'kv')


def projector(cfg: ModelConfig, heads: int, axes: tuple[str, ...], name: str
              ) -> Callable[[jax.Array], jax.Array]:
  """x [B, T, D] → [B, T, heads, head_dim]; one set of parameters however often it is called."""
  project = layers.projection(cfg, (heads, cfg.head_dim), axes, name)

  def apply(x_BxTxD: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(project(x_BxTxD), ('batch', 'length', axes[1], 'kv'))
  return apply


def qkv(cfg: ModelConfig, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(q [B,T,H,Dh], k [B,T,K,Dh], v [B,T,K,Dh]) of the block's input."""
  q = projector(cfg, cfg.num_heads, QUERY_AXES, 'query')(x_BxTxD)
  k = projector(cfg, cfg.kv_heads, KV_AXES, 'key')(x_BxTxD)
  v = projector(cfg, cfg.kv_heads, KV_AXES, 'value')(x_BxTxD)
  return q, k, v


def output(cfg: ModelConfig, out_BxTxHxD: jax.Array) -> jax.Array:
  """[B, T, H, Dh] → [B, T, D] through the 'out' projection."""
  out = nn.with_logical_constraint(out_BxTxHxD, ('batch', 'length', 'heads', 'kv'))
  return layers.projection(cfg, (cfg.d_model,), ('heads', 'kv', 'embed'), 'out', contract=2)(out)


def elu_plus_one(x: jax.Array) -> jax.Array:
  """σ(x) = elu(x) + 1 > 0: the feature map of Katharopoulos et al. 2020 eq. 7, used by
  Infini-attention's memory (Munkhdalai et al. 2024 §2.1.2). Float32."""
  return jax.nn.elu(x.astype('float32')) + 1.0
