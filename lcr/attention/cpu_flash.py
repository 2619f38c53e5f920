"""The ``cpu_flash`` backend: FlashAttention-2 tiling in a C++ kernel for CPUs, via ``jax.ffi``.

``cpu_flash.cc`` computes attention in 64×64 tiles with an online softmax (Dao 2023, Alg. 1) and its
backward pass from the row log-sum-exp (Alg. 2), reading q/k/v in the model's [B, T, H, D] layout;
which keys a query sees comes in as the [B, T, S] bool mask of :class:`MaskSpec`, and tiles with no
visible pair are skipped. Work is split over XLA's own intra-op thread pool (the calling thread and
the pool's other threads, at most one per core the caller may run on: query heads in the forward
pass, key/value heads in the backward pass), so the kernel starts no threads of its own. It is
compiled with the system C++ compiler (``$CXX``, else ``g++``/``c++``) the first time it is needed,
into a cache keyed by the source, the flags, jax's version and the CPU (``$LCR_CACHE_DIR``, default
``~/.cache/lcr``), and registered with XLA as two FFI targets. float32, no logit bias, head_dim a
multiple of 16. Without a compiler the backend reports itself unavailable and ``auto`` uses ``xla``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from lcr.attention.masks import MaskSpec

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cpu_flash.cc')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-pthread')
FORWARD, BACKWARD = 'lcr_cpu_flash_forward', 'lcr_cpu_flash_backward'
HEAD_DIM_MULTIPLE = 16


class CompileError(RuntimeError):
  """The kernel could not be built on this machine (no compiler, or it failed)."""


def compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if name and shutil.which(name):
      return name
  return None


def _cpu_signature() -> str:
  """The CPU's model and feature flags: ``-march=native`` builds only run where these match."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags'))][:2]
    return ''.join(lines)
  except OSError:
    return platform.processor() or platform.machine()


def cache_dir() -> str:
  return os.environ.get('LCR_CACHE_DIR', os.path.join(os.path.expanduser('~'), '.cache', 'lcr'))


@functools.cache
def library_path() -> str:
  """Path of the compiled kernel, building it first if this source/CPU has no cached build."""
  cxx = compiler()
  if cxx is None:
    raise CompileError('no C++ compiler found (set $CXX, or install g++)')
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(b'\0'.join([source, ' '.join(FLAGS).encode(), cxx.encode(),
                                   jax.__version__.encode(), _cpu_signature().encode()]))
  path = os.path.join(cache_dir(), f'cpu_flash-{key.hexdigest()[:16]}.so')
  if os.path.exists(path):
    return path
  os.makedirs(cache_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache_dir())
  os.close(fd)
  cmd = [cxx, *FLAGS, f'-I{jax.ffi.include_dir()}', SOURCE, '-o', tmp]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    os.unlink(tmp)
    raise CompileError(f'{" ".join(cmd)} failed:\n{result.stderr[-2000:]}')
  os.replace(tmp, path)   # atomic: concurrent builders each install a complete library
  return path


@functools.cache
def register() -> None:
  """Build (if needed), load and register the two FFI targets with XLA's CPU backend."""
  lib = ctypes.cdll.LoadLibrary(library_path())
  jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.LcrFlashForward), platform='cpu')
  jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(lib.LcrFlashBackward), platform='cpu')


@functools.cache
def unavailable() -> str | None:
  """None when the kernel builds and loads here, else why not (once per process)."""
  try:
    register()
  except (CompileError, OSError) as e:
    return f'the C++ kernel is unavailable: {e}'
  return None


def _forward_call(q, k, v, visible, scale):
  register()
  b, t, h, _ = q.shape
  return jax.ffi.ffi_call(
      FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      vmap_method='sequential')(q, k, v, visible, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def flash(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, visible_BxTxS, scale):
  """softmax(scale·q·kᵀ) v over visible keys, float32, computed by the C++ kernel."""
  return _forward_call(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, visible_BxTxS, scale)[0]


def _flash_forward(q, k, v, visible, scale):
  out, lse = _forward_call(q, k, v, visible, scale)
  return out, (q, k, v, visible, out, lse)


def _flash_backward(scale, residuals, d_out):
  q, k, v, visible, out, lse = residuals
  register()
  d_q, d_k, d_v = jax.ffi.ffi_call(
      BACKWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                 jax.ShapeDtypeStruct(k.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v.shape, jnp.float32)),
      vmap_method='sequential')(q, k, v, visible, out, lse, d_out.astype(jnp.float32),
                                scale=np.float32(scale))
  return d_q, d_k, d_v, None


flash.defvjp(_flash_forward, _flash_backward)


def supports(dtype: str, head_dim: int, has_bias: bool) -> str | None:
  """None when ``cpu_flash`` can run a call with these properties, else why not."""
  if dtype != 'float32':
    return f'cpu_flash computes in float32, not {dtype}'
  if has_bias:
    return 'cpu_flash takes no logit bias (ALiBi, T5)'
  if head_dim % HEAD_DIM_MULTIPLE:
    return f'cpu_flash needs head_dim a multiple of {HEAD_DIM_MULTIPLE}, not {head_dim}'
  return unavailable()


def cpu_flash_attention(q, k, v, *, q_pos, k_pos, q_segments, k_segments, mask: MaskSpec,
                        bias_fn, scale, chunk):
  """Attention by the C++ kernel; the mask is materialised as [B, T, S] bool (one byte each)."""
  del chunk
  if bias_fn is not None:
    raise ValueError('cpu_flash takes no logit bias')
  visible = mask.visible(q_pos, k_pos, q_segments, k_segments, kv_len=k.shape[1])
  return flash(q, k, v, visible, float(scale))
