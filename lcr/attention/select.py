"""The backend registry and ``auto``: the fastest backend that supports a call on this platform."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
from absl import logging

from lcr.attention import cpu_flash
from lcr.attention.chunked import chunked_attention
from lcr.attention.dense import xla_attention
from lcr.attention.kernels import cudnn_attention, cudnn_bytes, splash_attention, splash_supports
from lcr.attention.masks import MaskSpec

# `auto` keeps the dense `xla` backend up to this many logits per head (T·S), per platform. Past
# it the T×S logits dominate memory (XLA on CPU peaks at ~3.5× their size) and `chunked` wins; on
# CPU it is faster from 1k tokens on (benchmarks/long_eval.py: 0.11 s vs 0.25 s at 1024).
DENSE_MAX_LOGITS = {'cpu': 512 * 512, 'gpu': 4096 * 4096, 'tpu': 4096 * 4096}
# Largest mask/bias array `auto` lets the cudnn backend materialise.
CUDNN_MAX_BYTES = 2 << 30
CUDNN_DTYPES = ('bfloat16', 'float16')
CUDNN_MAX_HEAD_DIM = 128
# Largest [B, T, S] bool mask `auto` lets the cpu_flash backend materialise (T = S = 16k at B = 1).
CPU_FLASH_MAX_MASK_BYTES = 1 << 28
# Fewer queries than this per call (cached decoding steps) go to `xla`: the kernel's 64-row tiles
# would run nearly empty (benchmarks/decode.py: 3.3 ms against 0.35 ms per token at 1k context).
CPU_FLASH_MIN_QUERIES = 16


@dataclasses.dataclass(frozen=True)
class Call:
  """What backend selection needs to know about one ``attend`` call (all static)."""
  platform: str                # jax.default_backend(): 'cpu' | 'gpu' | 'tpu'
  dtype: str                   # query dtype name
  batch: int
  heads: int
  head_dim: int
  q_len: int
  kv_len: int
  has_bias: bool
  mask: MaskSpec
  devices: int = 1             # devices of the mesh the call is traced under (1: none)


def _cudnn_supports(call: Call) -> str | None:
  if call.dtype not in CUDNN_DTYPES:
    return f'cuDNN flash attention needs bfloat16/float16 activations, not {call.dtype}'
  if call.head_dim > CUDNN_MAX_HEAD_DIM or call.head_dim % 8:
    return f'cuDNN needs head_dim a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}, not {call.head_dim}'
  return None


def _cudnn_fits(call: Call) -> str | None:
  size = cudnn_bytes(call.batch, call.heads, call.q_len, call.kv_len, call.has_bias)
  if size > CUDNN_MAX_BYTES:
    return f'the cudnn mask/bias array would take {size / 2**30:.1f} GiB'
  return None


def _cpu_flash_supports(call: Call) -> str | None:
  return cpu_flash.supports(call.dtype, call.head_dim, call.has_bias)


def _cpu_flash_fits(call: Call) -> str | None:
  if call.q_len < CPU_FLASH_MIN_QUERIES:
    return f'{call.q_len} queries fill no kernel tile (decoding steps run dense)'
  if call.devices > 1:   # XLA does not partition the kernel: it would gather q, k, v on each device
    return f'the kernel runs unpartitioned, not over {call.devices} devices'
  size = call.batch * call.q_len * call.kv_len
  if size > CPU_FLASH_MAX_MASK_BYTES:
    return f'the cpu_flash mask would take {size / 2**30:.1f} GiB'
  return None


def _dense_fits(call: Call) -> str | None:
  limit = DENSE_MAX_LOGITS.get(call.platform, min(DENSE_MAX_LOGITS.values()))
  if call.q_len * call.kv_len > limit:
    return f'{call.q_len}×{call.kv_len} logits per head exceed {limit}'
  return None


@dataclasses.dataclass(frozen=True)
class Backend:
  name: str
  fn: Callable[..., object]
  platforms: tuple[str, ...]                          # where `auto` considers it
  supports: Callable[[Call], str | None]              # None = can run it, else why not
  auto_fits: Callable[[Call], str | None] = lambda call: None   # extra limits `auto` applies


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend('splash', splash_attention, ('tpu',),
            lambda c: splash_supports(c.mask, c.has_bias, c.q_len, c.kv_len)),
    Backend('cudnn', cudnn_attention, ('gpu',), _cudnn_supports, _cudnn_fits),
    Backend('cpu_flash', cpu_flash.cpu_flash_attention, ('cpu',), _cpu_flash_supports,
            _cpu_flash_fits),
    Backend('xla', xla_attention, ('cpu', 'gpu', 'tpu'), lambda c: None, _dense_fits),
    Backend('chunked', chunked_attention, ('cpu', 'gpu', 'tpu'), lambda c: None),
)}
# Fastest first; chunked always applies.
AUTO_ORDER = ('splash', 'cudnn', 'cpu_flash', 'xla', 'chunked')


def choose(call: Call) -> tuple[str, str]:
  """(backend name, reason) that ``auto`` picks for ``call``: a pure function of its fields."""
  passed = []
  for name in AUTO_ORDER:
    backend = BACKENDS[name]
    if call.platform not in backend.platforms:
      continue
    why_not = backend.supports(call) or backend.auto_fits(call)
    if why_not is None:
      reason = f'{name} on {call.platform}' + (f' ({"; ".join(passed)})' if passed else '')
      return name, reason
    passed.append(f'not {name}: {why_not}')
  raise AssertionError('chunked supports every call')


_logged: set[tuple[str, ...]] = set()


def resolve(name: str, call: Call) -> str:
  """The backend to run: ``name`` itself (checked), or ``auto``'s choice, logged once per kind."""
  if name == 'auto':
    chosen, reason = choose(call)
    key = (chosen, call.platform, call.dtype, call.mask.kind, str(call.has_bias))
    if key not in _logged:
      _logged.add(key)
      logging.info('attention backend auto → %s: %s', chosen, reason)
    return chosen
  if name not in BACKENDS:
    raise ValueError(f'unknown attention backend {name!r}; known: auto, {", ".join(BACKENDS)}')
  why_not = BACKENDS[name].supports(call)
  if why_not:
    raise ValueError(f'attention backend {name!r} cannot run this call: {why_not}')
  return name


def dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name
