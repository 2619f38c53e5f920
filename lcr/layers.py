"""Norms and feed-forward layers, each chosen by name from a registry."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr.config import ModelConfig


def dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
  return nn.Dense(
      features, use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes), name=name)


class Projection(nn.Module):
  """y = x · W over the trailing ``contract`` dims of x, with a kernel of shape [*x.shape[-contract:],
  *features] named by ``axes`` (e.g. [embed, heads, kv] for the query projection).

  The linear map of flax's DenseGeneral, with the same initial values (the initializer sees the
  flattened [fan_in, fan_out] matrix), but the kernel keeps its full shape, and so its logical axis
  names, wherever it is read: the model can be traced under a mesh and logical-axis rules, where its
  activation sharding constraints take effect.
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]
  contract: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.contract:]

    def init(rng, shape, dtype):
      flat = (math.prod(in_shape), math.prod(self.features))
      return nn.initializers.xavier_uniform()(rng, flat, dtype).reshape(shape)

    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes),
                        tuple(in_shape) + tuple(self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return jnp.tensordot(x, kernel, axes=self.contract)


def projection(cfg: ModelConfig, features: tuple[int, ...], axes: tuple[str, ...], name: str,
               contract: int = 1) -> Projection:
  return Projection(tuple(features), tuple(axes), contract, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), name=name)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019), computed in float32."""
  kwargs = dict(dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)))
  if cfg.norm == 'rmsnorm':
    return NORMS['rmsnorm'](**kwargs)
  return NORMS['layernorm'](
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)), **kwargs)


NORMS = {'layernorm': nn.LayerNorm, 'rmsnorm': nn.RMSNorm}


def _activation_constraint(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, ('batch', 'length', 'mlp'))


class Mlp(nn.Module):
  """Position-wise FFN, Vaswani et al. 2017 eq. 2 with GELU (Hendrycks & Gimpel 2016)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h = _activation_constraint(nn.gelu(dense(self.cfg, self.cfg.hidden_dim, ('embed', 'mlp'), 'wi')(x_BxTxD)))
    return dense(self.cfg, self.cfg.d_model, ('mlp', 'embed'), 'wo')(h)


class GatedFfn(nn.Module):
  """GLU variants, Shazeer 2020 eq. 6: (act(x W) ⊙ x V) W2 with act = swish (SwiGLU) or GELU (GeGLU)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    act = nn.silu if self.cfg.ffn == 'swiglu' else nn.gelu
    gate = act(dense(self.cfg, self.cfg.hidden_dim, ('embed', 'mlp'), 'wi_gate')(x_BxTxD))
    h = _activation_constraint(gate * dense(self.cfg, self.cfg.hidden_dim, ('embed', 'mlp'), 'wi_up')(x_BxTxD))
    return dense(self.cfg, self.cfg.d_model, ('mlp', 'embed'), 'wo')(h)


FFNS: dict[str, type[nn.Module]] = {'mlp': Mlp, 'swiglu': GatedFfn, 'geglu': GatedFfn}
