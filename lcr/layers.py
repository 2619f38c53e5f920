"""Norms, residual placements and feed-forward layers, each chosen by name from a registry."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcr.config import ModelConfig

# Flax collections the model sows into; lcr.step reads them. Everything sown in AUX_LOSSES is added
# to the training loss; MODEL_METRICS holds scalars to log (e.g. each MoE layer's expert load).
AUX_LOSSES = 'losses'
MODEL_METRICS = 'metrics'


# ----------------------------------------------------------------------------------------------
# DeepNorm (Wang et al. 2022, "DeepNet"), decoder-only column of Table 1, N = model.num_layers:
# x ← LN(α·x + f(x)) with α = (2N)^(1/4), and the value, attention-output and FFN kernels
# initialised scaled by β = (8N)^(−1/4) (their Xavier init times β; queries and keys keep gain 1).
DEEPNORM_SCALED = ('value', 'out', 'wi', 'wi_gate', 'wi_up', 'wo')


def deepnorm_alpha(num_layers: int) -> float:
  return (2.0 * num_layers) ** 0.25


def deepnorm_beta(num_layers: int) -> float:
  return (8.0 * num_layers) ** -0.25


def init_scale(cfg: ModelConfig, name: str) -> float:
  """The factor on a kernel's initial values: β for DeepNorm's scaled kernels, else 1."""
  if cfg.norm_placement == 'deepnorm' and name in DEEPNORM_SCALED:
    return deepnorm_beta(cfg.num_layers)
  return 1.0


def xavier_uniform(scale: float = 1.0, **axes) -> nn.initializers.Initializer:
  """Glorot & Bengio's uniform init times ``scale`` (variance × scale²)."""
  return nn.initializers.variance_scaling(scale ** 2, 'fan_avg', 'uniform', **axes)


def dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
  init = xavier_uniform(init_scale(cfg, name))
  return nn.Dense(
      features, use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nn.with_logical_partitioning(init, axes), name=name)


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
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.contract:]

    def init(rng, shape, dtype):
      flat = (math.prod(in_shape), math.prod(self.features))
      return xavier_uniform(self.init_scale)(rng, flat, dtype).reshape(shape)

    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes),
                        tuple(in_shape) + tuple(self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return jnp.tensordot(x, kernel, axes=self.contract)


def projection(cfg: ModelConfig, features: tuple[int, ...], axes: tuple[str, ...], name: str,
               contract: int = 1) -> Projection:
  return Projection(tuple(features), tuple(axes), contract, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), init_scale=init_scale(cfg, name),
                    name=name)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019), computed in float32."""
  kwargs = dict(dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)))
  if cfg.norm == 'rmsnorm':
    return NORMS['rmsnorm'](**kwargs)
  return NORMS['layernorm'](
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)), **kwargs)


NORMS = {'layernorm': nn.LayerNorm, 'rmsnorm': nn.RMSNorm}

Sublayer = Callable[[jax.Array], jax.Array]


def _pre_norm(cfg: ModelConfig, x: jax.Array, f: Sublayer, norm_: nn.Module) -> jax.Array:
  return x + f(norm_(x).astype(x.dtype))


def _post_norm(cfg: ModelConfig, x: jax.Array, f: Sublayer, norm_: nn.Module) -> jax.Array:
  return norm_(x + f(x)).astype(x.dtype)


def _deepnorm(cfg: ModelConfig, x: jax.Array, f: Sublayer, norm_: nn.Module) -> jax.Array:
  alpha = jnp.asarray(deepnorm_alpha(cfg.num_layers), x.dtype)   # DeepNet eq. (4), Table 1
  return norm_(alpha * x + f(x)).astype(x.dtype)


# model.norm_placement: how a sublayer f and its norm wrap the residual stream x (Xiong et al. 2020
# for pre/post; DeepNet for deepnorm). Post-norm placements end without a final norm.
RESIDUALS: dict[str, Callable[[ModelConfig, jax.Array, Sublayer, nn.Module], jax.Array]] = {
    'pre': _pre_norm, 'post': _post_norm, 'deepnorm': _deepnorm}


def _activation_constraint(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, ('batch', 'length', 'mlp'))


# The activation of each dense FFN kind (the gate's, for the GLU variants).
ACTIVATIONS = {'mlp': nn.gelu, 'swiglu': nn.silu, 'geglu': nn.gelu}
GATED = ('swiglu', 'geglu')


class Ffn(nn.Module):
  """What every FFN kind is built from: the config, its kind ('' = cfg.ffn), and whether the pass
  is deterministic (evaluation)."""
  cfg: ModelConfig
  kind: str = ''
  deterministic: bool = True


class Mlp(Ffn):
  """Position-wise FFN, Vaswani et al. 2017 eq. 2 with GELU (Hendrycks & Gimpel 2016)."""

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h = _activation_constraint(nn.gelu(dense(self.cfg, self.cfg.hidden_dim, ('embed', 'mlp'), 'wi')(x_BxTxD)))
    return dense(self.cfg, self.cfg.d_model, ('mlp', 'embed'), 'wo')(h)


class GatedFfn(Ffn):
  """GLU variants, Shazeer 2020 eq. 6: (act(x W) ⊙ x V) W2 with act = swish (SwiGLU) or GELU (GeGLU)."""

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.kind or self.cfg.ffn]
    gate = act(dense(self.cfg, self.cfg.hidden_dim, ('embed', 'mlp'), 'wi_gate')(x_BxTxD))
    h = _activation_constraint(gate * dense(self.cfg, self.cfg.hidden_dim, ('embed', 'mlp'), 'wi_up')(x_BxTxD))
    return dense(self.cfg, self.cfg.d_model, ('mlp', 'embed'), 'wo')(h)


# FFN kinds by name, built as FFNS[kind](cfg, kind, deterministic, name=...); lcr.moe adds 'moe'.
FFNS: dict[str, type[Ffn]] = {'mlp': Mlp, 'swiglu': GatedFfn, 'geglu': GatedFfn}

from lcr import moe as _moe  # noqa: E402,F401  (registers FFNS['moe']; it builds on this module)
