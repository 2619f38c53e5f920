"""Train state, its sharded initialisation, and the jitted train and evaluation steps."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lcr import layers, losses, matmul_layout, moe, optim, peft, sharding
from lcr.attention import context_parallel
from lcr.config import Config
from lcr.mixers import carry
from lcr.model import TransformerLM

# Flax collection in which a module reports auxiliary losses (``self.sow(AUX_LOSSES, name, v)``);
# the trainer adds the sum of everything sown there to the token cross-entropy. Scalars sown in
# MODEL_METRICS (MoE routing statistics) are returned with the train step's metrics.
AUX_LOSSES = layers.AUX_LOSSES
MODEL_METRICS = layers.MODEL_METRICS

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# XLA:CPU's YNNPACK library fusions (dots, reductions, element-wise ops) made the train step 5–10 %
# slower than XLA's own emitters (docs/performance.md); the steps are compiled without them.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue training bit for bit (besides the data)."""
  step: jax.Array
  params: Any
  opt_state: Any
  # A recurrent model's state from the last step (data.contiguous; lcr.mixers.carry), else None.
  memory: Any = None


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The compiled pieces of one run: model, optimizer, mesh, shardings and jitted steps."""
  config: Config
  model: TransformerLM
  tx: optax.GradientTransformation
  mesh: Mesh
  state_sharding: Any
  batch_sharding: NamedSharding
  num_params: int
  train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  eval_step: Callable[[Any, Batch], Metrics]
  init: Callable[[jax.Array], TrainState]

  def init_state(self) -> TrainState:
    """Fresh parameters and optimizer state from config.seed, created directly in their shards."""
    return self.init(jax.random.key(self.config.seed))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state without allocating it (restore target)."""
    shapes = jax.eval_shape(self.init, jax.random.key(self.config.seed))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_sharding)


def _init_state(model: TransformerLM, tx: optax.GradientTransformation, seq_len: int,
                rng: jax.Array, memory: Any = None) -> TrainState:
  params = nn.meta.unbox(_init_params(model, rng, seq_len))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    memory=None if memory is None else carry.empty(memory))


def _init_params(model: TransformerLM, rng: jax.Array, seq_len: int) -> Any:
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))['params']


def abstract_params(model: TransformerLM, seq_len: int) -> Any:
  """Shapes and dtypes of the model's parameters, without allocating them."""
  return nn.meta.unbox(jax.eval_shape(lambda r: _init_params(model, r, seq_len), jax.random.key(0)))


def param_shardings(model: TransformerLM, seq_len: int, mesh: Mesh, config: Config) -> tuple[Any, Any]:
  """(abstract boxed params, NamedShardings from their logical axes and config.mesh.rules)."""
  boxed = jax.eval_shape(lambda r: _init_params(model, r, seq_len), jax.random.key(0))
  return boxed, sharding.logical_shardings(boxed, mesh, config.mesh)


def forward(model: TransformerLM, params: Any, batch: Batch, *, rng: jax.Array | None = None):
  """(logits [B, T, V] float32, sum of auxiliary losses the model sowed)."""
  logits, sown = forward_sown(model, params, batch, rng=rng)
  return logits, sown_aux_loss(sown)


def forward_sown(model: TransformerLM, params: Any, batch: Batch, *, rng: jax.Array | None = None,
                 memory: Any = None):
  """(logits [B, T, V] float32, the collections the model sowed: AUX_LOSSES, MODEL_METRICS).

  With ``memory`` (data.contiguous: the ``cache`` collection of a stateful model, lcr.mixers.carry)
  the model starts from that state, and the returned collections hold the one it ends in, 'cache'.
  Dense layers run as 2-D matmuls (lcr.matmul_layout): same result, a faster backward pass.
  """
  deterministic = rng is None
  variables = {'params': params} if memory is None else {'params': params, 'cache': memory}
  mutable = [AUX_LOSSES, MODEL_METRICS] + ([] if memory is None else ['cache'])
  with matmul_layout.two_d_matmuls():
    return model.apply(variables, batch['inputs'], batch['positions'],
                       batch['segment_ids'], deterministic=deterministic,
                       rngs=None if deterministic else {'dropout': rng}, mutable=mutable)


def sown_aux_loss(sown: Any) -> jax.Array:
  """The sum of everything sown in AUX_LOSSES (0 when nothing was)."""
  return sum((jnp.sum(x) for x in jax.tree.leaves(sown.get(AUX_LOSSES, {}))),
             jnp.zeros((), jnp.float32))


def make_train_step(model: TransformerLM, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int,
                    freeze: Callable[[Any], Any] = lambda params: params):
  """One optimizer step on a global batch; the metrics are means over its non-padding tokens.

  ``freeze`` stops the gradient of frozen parameters (lcr.peft), so none is computed for them.
  """
  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(jax.random.key(seed), state.step)   # dropout: same on resume

    def loss_fn(params):
      logits, sown = forward_sown(model, freeze(params), batch, rng=rng, memory=state.memory)
      aux_loss = sown_aux_loss(sown)
      sum_loss, sum_weights = losses.cross_entropy(logits, batch['targets'], batch['weights'])
      ce = sum_loss / jnp.maximum(sum_weights, 1.0)
      # data.contiguous: the state the next step starts from (no gradient across steps)
      memory = (None if state.memory is None
                else jax.lax.stop_gradient(nn.meta.unbox(sown['cache'])))
      return ce + aux_loss, (ce, aux_loss, sum_weights, sown.get(MODEL_METRICS, {}), memory)

    (_, (ce, aux_loss, tokens, sown_metrics, memory)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state, memory=memory)
    metrics = {'loss': ce, 'aux_loss': aux_loss, 'grad_norm': optax.tree.norm(grads),
               'lr': schedule(state.step), 'train_tokens': tokens,
               **moe.summarize(sown_metrics, getattr(model, 'cfg', None))}
    return new_state, metrics
  return train_step


def make_eval_step(model: TransformerLM):
  def eval_step(params: Any, batch: Batch) -> Metrics:
    logits, _ = forward(model, params, batch)
    sum_loss, sum_weights = losses.cross_entropy(logits, batch['targets'], batch['weights'])
    return {'sum_loss': sum_loss, 'sum_weights': sum_weights}
  return eval_step


def _carried_memory(config: Config, mesh: Mesh) -> tuple[TransformerLM | None, Any, Any]:
  """(the stateful model, its abstract state, the state's shardings) when data.contiguous carries
  a recurrent state across steps (lcr.mixers.carry); (None, None, None) otherwise."""
  if not config.data.contiguous:
    return None, None, None
  model = peft.build_model(config).clone(cache=carry.STATE_ONLY)   # with LoRA/adapters, if any
  abstract = carry.abstract_memory(model, config.train.batch_size, config.train.seq_len)
  return model, abstract, sharding.logical_shardings(abstract, mesh, config.mesh)


@functools.lru_cache(maxsize=4)
def make_trainer(config: Config, mesh: Mesh | None = None) -> Trainer:
  """Builds the mesh (checking it and the batch against the devices) and jits the steps.

  Cached: training the same config again in this process (resuming, re-evaluating) reuses the
  compiled steps.
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  sharding.check_batch(mesh, config.mesh, config.train.batch_size)
  sharding.check_experts(mesh, config.mesh, config.model)
  model = peft.build_model(config)
  schedule = optim.learning_rate(config.train)
  boxed, p_shardings = param_shardings(model, config.train.seq_len, mesh, config)
  abstract_params = nn.meta.unbox(boxed)
  peft.check(config.peft, abstract_params)
  tx = peft.optimizer(config.peft, optim.optimizer(config.train))
  repl = sharding.replicated(mesh)
  frozen = lambda x: isinstance(x, optax.MaskedNode)   # noqa: E731  (no state: lcr.peft)
  opt_shardings = optax.tree_map_params(
      tx, lambda p, s: p if frozen(p) else s, jax.eval_shape(tx.init, abstract_params), p_shardings,
      transform_non_params=lambda _: repl, is_leaf=frozen)
  train_model, memory, memory_sharding = _carried_memory(config, mesh)
  state_sharding = TrainState(step=repl, params=p_shardings, opt_state=opt_shardings,
                              memory=memory_sharding)
  batch_sharding = sharding.batch_sharding(mesh, config.mesh)
  metric_sharding = repl
  # With the sequence sharded, every batch is first put in causal load-balanced order.
  cp = context_parallel.trainer_size(config, dict(mesh.shape))
  train_step = context_parallel.balanced(
      make_train_step(train_model or model, tx, schedule, config.seed,
                      peft.stop_frozen_gradients(config.peft)), cp)
  eval_step = context_parallel.balanced(make_eval_step(model), cp)
  options = CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == 'cpu' else None
  train_step = jax.jit(sharding.under_rules(train_step, mesh, config.mesh),
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, metric_sharding), donate_argnums=0,
                       compiler_options=options)
  eval_step = jax.jit(sharding.under_rules(eval_step, mesh, config.mesh), in_shardings=(p_shardings, batch_sharding),
                      out_shardings=metric_sharding, compiler_options=options)
  init = jax.jit(functools.partial(_init_state, model, tx, config.train.seq_len, memory=memory),
                 out_shardings=state_sharding)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  return Trainer(config=config, model=model, tx=tx, mesh=mesh, state_sharding=state_sharding,
                 batch_sharding=batch_sharding, num_params=num_params, train_step=train_step,
                 eval_step=eval_step, init=init)
