"""Parameter-efficient fine-tuning: LoRA (Hu et al. 2021) and adapters (Houlsby et al. 2019).

``build_model(config)`` is the plain :class:`~lcr.model.TransformerLM` when ``peft.method='none'``,
else :class:`PeftLM`: the same model, run under a flax method interceptor that adds

* ``lora``: beside every matmul kernel W whose parameter path matches ``peft.targets``, a rank-r
  update h = x·W + (α/r)·(x·A)·B (Hu et al. 2021 eq. 3, written for row vectors), A [d_in, r] drawn
  from N(0, 1/d_in) and B [r, d_out] = 0, so the initial model is exactly the base (§4.1);
  parameters ``lora_a`` and ``lora_b`` sit beside the kernel ('layer_0/attention/query/lora_a');
* ``adapter``: after each block's attention and FFN sublayer (before the residual is added), the
  bottleneck h + W_up·f(W_down·h + b_down) + b_up of width ``peft.adapter_dim`` (Houlsby et al. 2019
  §2.1, Figure 2) with f = GELU, W_down from N(0, 10⁻²) truncated at 2σ (their §3.6) and W_up, b_up
  zero: the near-identity initialisation taken to its limit, so the initial model is the base.

The base model's code is untouched, so every positional encoding, attention pattern and backend
works with both. The parameters of the base are frozen: :func:`optimizer` gives them
``optax.set_to_zero`` through ``optax.multi_transform`` (Adam holds no moments for them) and
:func:`stop_frozen_gradients` keeps the backward pass from computing their gradients.
``peft.trainable_extra`` unfreezes more (LongLoRA, Chen et al. 2024 §3.3: 'token_embedding|norm').
:func:`merge` folds LoRA into the kernels, W + (α/r)·A·B, for evaluation and export.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lcr import layers
from lcr.config import Config, ModelConfig, PeftConfig, fail
from lcr.model import Block, TransformerLM

LORA_A, LORA_B, ADAPTER = 'lora_a', 'lora_b', 'adapter'
ADAPTED_SUBLAYERS = ('attention', 'ffn')   # the Block's sublayers an adapter follows
TRAINABLE, FROZEN = 'trainable', 'frozen'


def path_name(path: tuple) -> str:
  """'layer_0/attention/query/kernel' for a jax key path or a tuple of names."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _paths(params: Any) -> list[str]:
  return [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def is_peft_param(name: str) -> bool:
  """Does the parameter path name a parameter that PEFT adds (not one of the base model)?"""
  parts = name.split('/')
  return LORA_A in parts or LORA_B in parts or ADAPTER in parts


# ----------------------------------------------------------------------------------------------
# The model: the base under an interceptor.


class Adapter(nn.Module):
  """Houlsby et al. 2019 §2.1: h + W_up·GELU(W_down·h + b_down) + b_up; exactly h at first."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    down = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name='down',
                    kernel_init=nn.initializers.truncated_normal(1e-2, lower=-2.0, upper=2.0))
    up = nn.Dense(h.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name='up',
                  kernel_init=nn.initializers.zeros)
    return h + up(nn.gelu(down(h))).astype(h.dtype)


def _lora_shapes(module: nn.Module, x: jax.Array) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
  """(contracted dims, input shape, output features) of a Dense or Projection call on x."""
  if isinstance(module, nn.Dense):
    return 1, x.shape[-1:], (module.features,)
  return module.contract, x.shape[x.ndim - module.contract:], tuple(module.features)


def _lora_update(cfg: PeftConfig, module: nn.Module, x: jax.Array) -> jax.Array:
  """(α/r)·(x·A)·B with A, B created in ``module``'s scope (Hu et al. 2021 §4.1)."""
  contract, in_shape, features = _lora_shapes(module, x)
  fan_in = math.prod(in_shape)
  a = module.param(LORA_A, nn.initializers.normal(fan_in ** -0.5), (*in_shape, cfg.rank),
                   module.param_dtype)
  b = module.param(LORA_B, nn.initializers.zeros, (cfg.rank, *features), module.param_dtype)
  x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
  return (cfg.alpha / cfg.rank) * jnp.tensordot(jnp.tensordot(x, a, axes=contract), b, axes=1)


def _is_adapted_sublayer(module: nn.Module) -> bool:
  return module.name in ADAPTED_SUBLAYERS and isinstance(module.parent, Block)


def _interceptor(cfg: PeftConfig, model_cfg: ModelConfig) -> Callable:
  """The flax method interceptor that adds LoRA updates or adapters to the base model's calls."""
  targets = re.compile(cfg.targets)

  def intercept(next_fun, args, kwargs, context):
    module, y = context.module, next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return y
    if cfg.method == 'lora' and isinstance(module, (nn.Dense, layers.Projection)):
      if targets.search(path_name(module.path + ('kernel',))):
        y = y + _lora_update(cfg, module, args[0]).astype(y.dtype)
    elif cfg.method == 'adapter' and _is_adapted_sublayer(module):
      y = Adapter(cfg.adapter_dim, jnp.dtype(model_cfg.dtype), jnp.dtype(model_cfg.param_dtype),
                  name=ADAPTER)(y)
    return y
  return intercept


class PeftLM(TransformerLM):
  """TransformerLM with the LoRA updates or adapters of ``peft`` (module docstring)."""
  peft: PeftConfig = PeftConfig()

  def __call__(self, *args, **kwargs):
    with nn.intercept_methods(_interceptor(self.peft, self.cfg)):
      return super().__call__(*args, **kwargs)


def build_model(config: Config) -> nn.Module:
  """The model a run trains: TransformerLM, or PeftLM when ``peft.method`` is not 'none'."""
  return model_for(config.model, config.peft)


def model_for(model_cfg: ModelConfig, peft_cfg: PeftConfig) -> nn.Module:
  if peft_cfg.method == 'none':
    return TransformerLM(model_cfg)
  return PeftLM(model_cfg, peft=peft_cfg)


# ----------------------------------------------------------------------------------------------
# Which parameters train.


def trainable_mask(cfg: PeftConfig, params: Any) -> Any:
  """A tree of bools like ``params``: True for what trains (everything when method is 'none')."""
  extra = re.compile(cfg.trainable_extra) if cfg.trainable_extra else None

  def trains(path, _):
    name = path_name(path)
    return (cfg.method == 'none' or is_peft_param(name)
            or (extra is not None and extra.search(name) is not None))
  return jax.tree_util.tree_map_with_path(trains, params)


def count(cfg: PeftConfig, params: Any) -> tuple[int, int]:
  """(trainable, total) numbers of parameter values."""
  sizes = jax.tree.leaves(jax.tree.map(lambda x: math.prod(x.shape), params))
  trains = jax.tree.leaves(trainable_mask(cfg, params))
  return sum(s for s, t in zip(sizes, trains) if t), sum(sizes)


def check(cfg: PeftConfig, params: Any) -> None:
  """ConfigError (before anything compiles) when ``targets`` or ``trainable_extra`` match nothing."""
  if cfg.method == 'none':
    return
  names = [n for n in _paths(params) if not is_peft_param(n)]
  if cfg.method == 'lora':
    kernels = [n for n in names if n.endswith('/kernel')]
    if not any(re.search(cfg.targets, n) for n in kernels):
      fail('peft.targets', cfg.targets, 'matches no parameter LoRA can adapt; the matmul kernels '
           f'of this model are: {", ".join(kernels)}')
  if cfg.trainable_extra and not any(re.search(cfg.trainable_extra, n) for n in names):
    fail('peft.trainable_extra', cfg.trainable_extra,
         f'matches no parameter; the parameters of this model are: {", ".join(names)}')


def optimizer(cfg: PeftConfig, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` on the trainable parameters, nothing (and no state) on the frozen ones."""
  if cfg.method == 'none':
    return tx
  labels = lambda params: jax.tree.map(lambda t: TRAINABLE if t else FROZEN,   # noqa: E731
                                       trainable_mask(cfg, params))
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def stop_frozen_gradients(cfg: PeftConfig) -> Callable[[Any], Any]:
  """params ↦ params with the frozen ones behind ``stop_gradient`` (identity if none is frozen)."""
  if cfg.method == 'none':
    return lambda params: params

  def freeze(params):
    return jax.tree.map(lambda t, x: x if t else jax.lax.stop_gradient(x),
                        trainable_mask(cfg, params), params)
  return freeze


# ----------------------------------------------------------------------------------------------
# Merging, for evaluation and export.


def _low_rank(a: jax.Array, b: jax.Array, kernel: jax.Array) -> jax.Array:
  """A·B contracted over the rank, [*in, *out]; stacked layers (nn.scan) map over the first axis."""
  if kernel.ndim == (a.ndim - 1) + (b.ndim - 1):
    return jnp.tensordot(a, b, axes=1)
  return jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)


def merge(cfg: PeftConfig, params: Any) -> Any:
  """The base model's parameters with every LoRA update folded in: W + (α/r)·A·B."""
  if cfg.method != 'lora':
    raise ValueError(f'only LoRA merges into the base weights, not peft.method={cfg.method!r}')

  def fold(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: fold(v) for k, v in tree.items() if k not in (LORA_A, LORA_B)}
    if LORA_A in tree:
      kernel = tree['kernel']
      delta = (cfg.alpha / cfg.rank) * _low_rank(tree[LORA_A].astype(jnp.float32),
                                                  tree[LORA_B].astype(jnp.float32), kernel)
      out['kernel'] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return out
  return fold(jax.tree.map(lambda x: x, params))


def for_evaluation(params: Any, peft_cfg: PeftConfig) -> tuple[Any, Callable[[ModelConfig], nn.Module]]:
  """(parameters, model class for a ModelConfig) to evaluate a run: LoRA merged into the base;
  adapters, which cannot merge, evaluated with them in place."""
  if peft_cfg.method == 'lora':
    return merge(peft_cfg, params), TransformerLM
  if peft_cfg.method == 'adapter':
    return params, functools.partial(PeftLM, peft=peft_cfg)
  return params, TransformerLM
