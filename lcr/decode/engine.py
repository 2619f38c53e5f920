"""Prefill a batch of prompts, then one compiled loop of cached steps: ``generate``.

Prompts of different lengths share a batch: they are right-padded to the longest (P), the prefill
runs the first P₀ = P tokens at once (StreamingLLM's renumbering cache: at most its capacity), and
the loop feeds each row one token per step at its own position — the row's next prompt token while
its prompt lasts, else the token just chosen — so every row continues exactly from its own last
prompt token. The whole generation is one ``jax.jit`` of a ``lax.while_loop``, compiled once per
(batch, P); the cache has a static size (lcr.decode.cache). A row ends at EOS, after
``max_new_tokens`` tokens, or when the host says so (stop strings, see ``on_step``).

``use_cache=False`` swaps the cached step for a full forward over the whole sequence so far at
every step: slow, and the reference the cache is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from lcr.config import ConfigError, DecodeConfig, MeshConfig, ModelConfig
from lcr.decode import cache as cache_lib
from lcr.decode import sampling
from lcr.model import TransformerLM

PAD_ID = 0
# on_step(tokens [B], generated_index [B], emitted [B]) → stop [B]: called on the host after every
# step; ``emitted`` marks rows whose token is a new generated one (index ≥ 0).
StepCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Generation:
  """Generated tokens [B, max_new_tokens] (PAD after a row's end) and how many each row has."""
  tokens: np.ndarray
  lengths: np.ndarray

  def row(self, b: int) -> np.ndarray:
    return self.tokens[b, :self.lengths[b]]


def pad_prompts(prompts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """([B, P] right-padded int32 prompts, [B] lengths); every prompt needs at least one token."""
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError('every prompt needs at least one token (got an empty prompt)')
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  padded = np.full((len(prompts), lengths.max()), PAD_ID, np.int32)
  for b, p in enumerate(prompts):
    padded[b, :len(p)] = p
  return padded, lengths


def check_servable(cfg: ModelConfig, layout: cache_lib.CacheLayout, longest_prompt: int,
                   max_new_tokens: int) -> None:
  """A learned position table must hold every position generation reaches (no silent clamp)."""
  if cfg.pos != 'learned':
    return
  reached = longest_prompt + max_new_tokens
  if layout.renumber:
    reached = min(reached, layout.capacity)
  if reached > cfg.max_len:
    raise ConfigError(
        f'config field decode.max_new_tokens={max_new_tokens} is invalid: a prompt of '
        f'{longest_prompt} tokens plus {max_new_tokens} new ones reaches position {reached - 1}, '
        f'past the learned table of model.max_len={cfg.max_len} positions; shorten the prompt or '
        'lower decode.max_new_tokens')


class Stepper:
  """The model as decoding calls it: prefill, then one token per row per step.

  Cached: the state is the ``cache`` collection. Uncached (``use_cache=False``): the state is the
  [B, P + N] token buffer, and each step runs the full model over it.

  The loops (:func:`decode_loop`, ``lcr.decode.beam.search_loop``) need only this protocol, so
  other models decode through them with a stepper of their own: ``prefill_len`` (prompt tokens
  the prefill takes), ``prefill(params, prompt [B, P], lengths [B]) → (logits [B, V], state)``
  and ``step(params, state, tokens [B], positions [B]) → (logits [B, V], state)``. ``params`` is
  passed through untouched (an encoder-decoder can pass its source in it), and every leaf of
  ``state`` has the batch first, or is an ``nn.Partitioned`` whose names say where 'batch' is
  (beam search reorders beams along it).
  """

  def __init__(self, cfg: ModelConfig, decode: DecodeConfig, prompt_len: int):
    self.cfg = dataclasses.replace(cfg, remat=False, dropout=0.0)
    self.use_cache = decode.use_cache
    self.total = prompt_len + decode.max_new_tokens
    self.layout = cache_lib.layout_for(self.cfg, self.total,
                                       rotated_dynamic_ntk=decode.rotated_key_cache)
    self.model = TransformerLM(self.cfg, cache=self.layout if self.use_cache else None)
    renumbers = self.use_cache and self.layout.renumber
    self.prefill_len = min(prompt_len, self.layout.capacity) if renumbers else prompt_len

  def prefill(self, params, prompt_BxP, lengths_B) -> tuple[jax.Array, Any]:
    """(logits [B, V] after each row's last prefilled token, state)."""
    b, p0 = prompt_BxP.shape[0], self.prefill_len
    tokens = prompt_BxP[:, :p0]
    positions = jnp.broadcast_to(jnp.arange(p0, dtype=jnp.int32), (b, p0))
    last = jnp.minimum(lengths_B, p0) - 1
    if not self.use_cache:
      buffer = jnp.zeros((b, self.total), jnp.int32).at[:, :prompt_BxP.shape[1]].set(prompt_BxP)
      return self._full(params, buffer, last), buffer
    real = (positions < lengths_B[:, None]).astype(jnp.int32)
    logits, state = self.model.apply({'params': params}, tokens, positions, real, fresh_cache=True,
                                     logits_index=last, mutable=['cache'])
    return logits[:, 0], state['cache']

  def step(self, params, state, tokens_B, positions_B) -> tuple[jax.Array, Any]:
    """(logits [B, V] after feeding token t at position p of each row, new state)."""
    if not self.use_cache:
      buffer = jax.vmap(lambda row, p, t: row.at[p].set(t))(state, positions_B, tokens_B)
      return self._full(params, buffer, positions_B), buffer
    logits, updated = self.model.apply(
        {'params': params, 'cache': state}, tokens_B[:, None], positions_B[:, None],
        jnp.ones_like(tokens_B)[:, None], mutable=['cache'])
    return logits[:, 0], updated['cache']

  def _full(self, params, buffer_BxL, last_B):
    """A full forward over the buffer, tokens past each row's ``last`` as padding."""
    positions = jnp.broadcast_to(jnp.arange(buffer_BxL.shape[1], dtype=jnp.int32), buffer_BxL.shape)
    real = (positions <= last_B[:, None]).astype(jnp.int32)
    return self.model.apply({'params': params}, buffer_BxL, positions, real,
                            logits_index=last_B)[:, 0]


def cached_logits(params: Any, model_cfg: ModelConfig, decode: DecodeConfig, tokens_BxT: np.ndarray,
                  prompt_lengths_B: np.ndarray) -> np.ndarray:
  """Teacher-forced decoding: prefill each row's first n_b tokens, then feed the rest one per step.

  Returns logits [B, S + 1, V] with S = T − max(n_b): entry j of row b predicts token n_b + j, made
  by the prefill (j = 0) or by cached step j. What a full forward gives at position n_b − 1 + j,
  if the cache is right. Each n_b must fit the prefill (StreamingLLM's cache: its capacity).
  """
  tokens = jnp.asarray(tokens_BxT, jnp.int32)
  lengths = jnp.asarray(prompt_lengths_B, jnp.int32)
  prompt_len = int(np.max(prompt_lengths_B))
  stepper = Stepper(model_cfg, dataclasses.replace(
      decode, max_new_tokens=tokens.shape[1] - prompt_len + 1), prompt_len)
  if prompt_len > stepper.prefill_len:
    raise ValueError(f'prompts of up to {stepper.prefill_len} tokens fit this cache\'s prefill')
  steps = tokens.shape[1] - prompt_len

  def run(params, tokens, lengths):
    logits, state = stepper.prefill(params, tokens[:, :prompt_len], lengths)

    def body(state, j):
      pos = lengths + j
      tok = jnp.take_along_axis(tokens, pos[:, None], axis=1)[:, 0]
      logits, state = stepper.step(params, state, tok, pos)
      return state, logits
    _, more = jax.lax.scan(body, state, jnp.arange(steps))
    return jnp.concatenate([logits[:, None], more.swapaxes(0, 1)], axis=1)
  return np.asarray(jax.jit(run)(params, tokens, lengths))


def chooser(decode: DecodeConfig) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """(logits [B, V], rows [B], positions [B]) → next tokens [B] under greedy or sampling."""
  if decode.strategy == 'greedy':
    return lambda logits, rows, positions: sampling.greedy(logits)
  if decode.strategy != 'sample':
    raise ValueError(f'chooser serves greedy and sample, not {decode.strategy!r}')

  def choose(logits, rows, positions):
    warped = sampling.warp(logits, temperature=decode.temperature, top_k=decode.top_k,
                           top_p=decode.top_p, min_tokens_to_keep=decode.min_tokens_to_keep)
    return sampling.sample(warped, sampling.row_keys(decode.seed, rows, positions))
  return choose


@dataclasses.dataclass
class _Loop:
  """State of the decoding loop; ``pos`` is the position of ``tok``, the token to feed next."""
  state: Any
  pos: jax.Array      # [B]
  tok: jax.Array      # [B]
  out: jax.Array      # [B, N]
  done: jax.Array     # [B]
  steps: jax.Array    # scalar


jax.tree_util.register_dataclass(_Loop, data_fields=['state', 'pos', 'tok', 'out', 'done', 'steps'],
                                 meta_fields=[])


def _advance(loop: _Loop, logits, prompt, lengths, *, choose, max_new: int, eos_id, on_step):
  """Moves every live row one position: the next prompt token, or a chosen one, recorded."""
  b = prompt.shape[0]
  rows = jnp.arange(b, dtype=jnp.int32)
  pos = loop.pos + 1
  forced = pos < lengths
  prompt_tok = jnp.take_along_axis(prompt, jnp.minimum(pos, prompt.shape[1] - 1)[:, None], 1)[:, 0]
  new = jnp.where(forced, prompt_tok, choose(logits, rows, pos))
  return _record(loop, new, pos, forced, lengths, max_new=max_new, eos_id=eos_id, on_step=on_step)


def _record(loop: _Loop, new, pos, forced, lengths, *, max_new, eos_id, on_step) -> _Loop:
  live = ~loop.done
  index = pos - lengths                          # index among the generated tokens
  emitted = live & ~forced
  out = jnp.where(emitted[:, None] & (jnp.arange(max_new)[None] == index[:, None]), new[:, None],
                  loop.out)
  ended = emitted & (index + 1 >= max_new)
  if eos_id is not None:
    ended |= emitted & (new == eos_id)
  if on_step is not None:
    ended |= emitted & io_callback(
        lambda *a: np.asarray(on_step(*map(np.asarray, a)), bool),
        jax.ShapeDtypeStruct(new.shape, jnp.bool_), new, index, emitted, ordered=True)
  return _Loop(loop.state, jnp.where(live, pos, loop.pos), jnp.where(live, new, loop.tok), out,
               loop.done | ended, loop.steps + 1)


def decode_loop(stepper: Stepper, choose, params, prompt_BxP, lengths_B, *, max_new: int,
                eos_id: int | None, on_step: StepCallback | None = None) -> tuple[jax.Array, jax.Array]:
  """(generated tokens [B, N], lengths [B]): prefill, then cached steps until every row ends."""
  b = prompt_BxP.shape[0]
  logits, state = stepper.prefill(params, prompt_BxP, lengths_B)
  start = jnp.minimum(lengths_B, stepper.prefill_len) - 1   # position of each row's last prefilled
  empty = _Loop(state, start, jnp.zeros((b,), jnp.int32), jnp.full((b, max_new), PAD_ID, jnp.int32),
                jnp.zeros((b,), bool), jnp.zeros((), jnp.int32))
  advance = functools.partial(_advance, prompt=prompt_BxP, lengths=lengths_B, choose=choose,
                              max_new=max_new, eos_id=eos_id, on_step=on_step)
  loop = advance(empty, logits)
  limit = prompt_BxP.shape[1] - stepper.prefill_len + max_new

  def body(loop: _Loop) -> _Loop:
    logits, state = stepper.step(params, loop.state, loop.tok, loop.pos)
    return advance(dataclasses.replace(loop, state=state), logits)

  loop = jax.lax.while_loop(lambda l: ~jnp.all(l.done) & (l.steps <= limit), body, loop)
  lengths = jnp.sum(jnp.arange(max_new)[None] <= (loop.pos - lengths_B)[:, None], axis=1)
  return loop.out, lengths.astype(jnp.int32)


def generate(params: Any, model_cfg: ModelConfig, decode: DecodeConfig,
             prompts: Sequence[np.ndarray], *, eos_id: int | None = None,
             on_step: StepCallback | None = None, mesh: jax.sharding.Mesh | None = None,
             mesh_cfg: MeshConfig | None = None) -> Generation:
  """Greedy or sampled continuations of ``prompts`` (token arrays) under ``decode``.

  With ``mesh`` the batch is split over the mesh's data axes and the cache follows the model's
  logical axes (``mesh_cfg.active_rules``); the result is the same on any number of devices.
  """
  if decode.strategy == 'beam':
    raise ValueError("decode.strategy='beam' goes through lcr.decode.beam.beam_search")
  prompt, lengths = pad_prompts(prompts)
  stepper = Stepper(model_cfg, decode, prompt.shape[1])
  check_servable(stepper.cfg, stepper.layout, int(lengths.max()), decode.max_new_tokens)
  run = functools.partial(decode_loop, stepper, chooser(decode), max_new=decode.max_new_tokens,
                          eos_id=eos_id, on_step=on_step)
  tokens, counts = compiled(run, mesh, mesh_cfg, stepper.cfg)(params, prompt, lengths)
  return Generation(np.asarray(tokens), np.asarray(counts))


def compiled(fn: Callable, mesh: jax.sharding.Mesh | None, mesh_cfg: MeshConfig | None,
             model_cfg: ModelConfig) -> Callable:
  """``jax.jit(fn)`` of (params, prompt [B, P], lengths [B]); with a mesh, traced under its
  logical-axis rules, parameters sharded by their logical axes and the batch over the data axes."""
  if mesh is None:
    return jax.jit(fn)
  from lcr import sharding   # only sharded decoding needs the mesh helpers
  mesh_cfg = mesh_cfg or MeshConfig()
  batch = sharding.batch_sharding(mesh, mesh_cfg)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch.spec[0]))
  params_sharding = param_shardings(model_cfg, mesh, mesh_cfg)

  jitted = jax.jit(sharding.under_rules(fn, mesh, mesh_cfg),
                   in_shardings=(params_sharding, batch, rows))

  def call(params, prompt, lengths):
    dp = sharding.data_parallel_size(mesh, mesh_cfg)
    if len(prompt) % dp:
      raise ConfigError(f'{len(prompt)} prompts do not split over the data-parallel size {dp} of '
                        f'mesh {dict(mesh.shape)}; give a multiple of {dp} prompts')
    return jitted(params, prompt, lengths)
  return call


def param_shardings(model_cfg: ModelConfig, mesh: jax.sharding.Mesh, mesh_cfg: MeshConfig) -> Any:
  """NamedShardings of a model's parameters from the logical axes their initialisers name."""
  from lcr import sharding
  model = TransformerLM(model_cfg)
  boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))['params'],
                         jax.random.key(0))
  return sharding.logical_shardings(boxed, mesh, mesh_cfg)
