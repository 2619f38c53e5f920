"""The device mesh from config, logical-axis shardings, multi-host start-up and global batches."""

from __future__ import annotations

import functools
import glob
import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcr.config import ConfigError, MeshConfig, ModelConfig, fail


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM, where ``jax.distributed.initialize()`` finds its peers by itself."""
  has_chips = bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')
                   or os.environ.get('TPU_WORKER_HOSTNAMES'))
  return has_chips and importlib.util.find_spec('libtpu') is not None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-process JAX: explicit coordinator flags, or auto-detected on a TPU VM.

  Must run before anything touches a device. With no coordinator on a machine that is not a TPU
  VM this does nothing (one process).
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ConfigError('--coordinator_address needs --num_processes and --process_id as well')
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id={process_id} must be in [0, --num_processes={num_processes})')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif num_processes not in (None, 1) or process_id not in (None, 0):
    raise ConfigError('--num_processes/--process_id need --coordinator_address=HOST:PORT of '
                      'process 0')
  elif on_cloud_tpu_vm():
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info('process %d of %d, %d local devices of %d', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """mesh.shape with its -1 filled in; a ConfigError naming mesh.shape if it cannot fit."""
  fixed = math.prod(s for s in cfg.shape if s != -1)
  if -1 in cfg.shape:
    if num_devices % fixed:
      fail('mesh.shape', cfg.shape, f'the fixed sizes multiply to {fixed}, which does not divide '
           f'the {num_devices} devices; choose sizes whose product divides {num_devices}')
    return tuple(num_devices // fixed if s == -1 else s for s in cfg.shape)
  if fixed != num_devices:
    fail('mesh.shape', cfg.shape, f'uses {fixed} devices but {num_devices} are available; make '
         f'the sizes multiply to {num_devices}, or set one of them to -1')
  return cfg.shape


def make_mesh(cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
  """The device mesh of ``cfg`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  shape = resolve_shape(cfg, len(devices))
  if devices[0].platform == 'tpu':
    # Lays the axes along the physical interconnect (fastest-varying axis on the nearest chips).
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    # Process-major order: each process holds a contiguous block of the leading (data) axes, so
    # its share of a batch is a contiguous block of rows.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.asarray(ordered, dtype=object).reshape(shape)
  return Mesh(grid, cfg.axes)


def data_parallel_size(mesh: Mesh, cfg: MeshConfig) -> int:
  """How many ways the batch is split: the product of the mesh axes 'batch' maps to."""
  return math.prod(mesh.shape[a] for a in cfg.axes_of('batch'))


def check_batch(mesh: Mesh, cfg: MeshConfig, batch_size: int, field: str = 'train.batch_size'):
  """Fails before compilation unless the batch splits evenly over data parallelism and hosts."""
  dp = data_parallel_size(mesh, cfg)
  if batch_size % dp:
    fail(field, batch_size, f'must be divisible by the data-parallel size {dp} (mesh axes '
         f'{cfg.axes_of("batch")} of mesh {dict(mesh.shape)}); use a multiple of {dp} or change '
         'mesh.shape')
  if dp % jax.process_count():
    fail('mesh.shape', cfg.shape, f'splits the batch {dp} ways over {jax.process_count()} '
         'processes; each process reads its own rows, so the data-parallel size (mesh axes '
         f'{cfg.axes_of("batch")}) must be a multiple of the process count')


def check_experts(mesh: Mesh, cfg: MeshConfig, model: ModelConfig) -> None:
  """Fails before compilation unless the experts split evenly over the mesh axes of 'expert'."""
  if model.ffn != 'moe':
    return
  ways = math.prod(mesh.shape[a] for a in cfg.axes_of('expert'))
  if model.moe.num_experts % ways:
    fail('model.moe.num_experts', model.moe.num_experts,
         f'must be divisible by the expert-parallel size {ways} (mesh axes {cfg.axes_of("expert")} '
         f'of mesh {dict(mesh.shape)}); use a multiple of {ways} or change mesh.shape')


def batch_sharding(mesh: Mesh, cfg: MeshConfig) -> NamedSharding:
  """[batch, length] arrays: rows split over the data-parallel axes."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(('batch', 'length'), cfg.active_rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Replicates any dimension its mesh axes do not divide (e.g. 4 kv heads on 8-way tensor)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    ways = math.prod(mesh.shape[a] for a in names)
    if dim % ways:
      logging.warning('dimension of size %d does not split %d ways over mesh axes %s: replicated',
                      dim, ways, names)
      axes = None
    out.append(axes)
  return PartitionSpec(*out)


def logical_shardings(abstract_tree: Any, mesh: Mesh, cfg: MeshConfig) -> Any:
  """NamedShardings for a tree of (boxed, abstract) arrays annotated with logical axis names.

  Leaves without annotations (step counters, scalars) are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, cfg.active_rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_tree))
  return jax.tree.map(lambda spec, shape: NamedSharding(mesh, _fit(spec, shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles every process's rows (its contiguous block of the batch) into global arrays."""
  def make(v):
    v = np.asarray(v)
    shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    return jax.make_array_from_process_local_data(sharding, v, shape)
  return {k: make(v) for k, v in local_batch.items()}


def under_rules(fn: Callable, mesh: Mesh, cfg: MeshConfig) -> Callable:
  """``fn`` traced with ``mesh`` and ``cfg.active_rules`` in scope, so that the model's activation
  constraints (``nn.with_logical_constraint``) become sharding constraints of the compiled step."""
  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(cfg.active_rules):
      return fn(*args)
  return traced
