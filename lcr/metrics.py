"""Metric files (workdir/metrics.jsonl and TensorBoard events), progress lines with ETA, FLOPs and MFU."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from lcr.config import ModelConfig

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'

# Dense peak FLOP/s per chip: (16-bit matmuls, float32 matmuls as the platform runs them by
# default: TF32 tensor cores on NVIDIA Ampere and later, one bf16 pass on TPU). Vendor data sheets;
# the first entry whose name occurs in jax.Device.device_kind wins.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ('TPU v6', 918e12, 918e12),
    ('TPU v5 lite', 197e12, 197e12),
    ('TPU v5e', 197e12, 197e12),
    ('TPU v5', 459e12, 459e12),
    ('TPU v4', 275e12, 275e12),
    ('TPU v3', 123e12, 123e12),
    ('TPU v2', 45e12, 45e12),
    ('H100 PCIe', 756e12, 378e12),
    ('H100', 989e12, 494e12),
    ('H200', 989e12, 494e12),
    ('A100', 312e12, 156e12),
    ('L4', 121e12, 60e12),
    ('V100', 125e12, 15.7e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak FLOP/s for matmuls in ``dtype``, or None when unknown (e.g. CPU)."""
  for name, half, single in PEAK_FLOPS:
    if name in device_kind:
      return single if dtype == 'float32' else half
  return None


def flops_per_token(cfg: ModelConfig, num_params: int, seq_len: int) -> float:
  """Training FLOPs per token, 6N + 6·L·T·D (Kaplan et al. 2020 §2.1; forward 2N+2LTD, backward 2×).

  N counts every parameter a token passes through (a tied embedding is also the output
  projection's matmul; of an MoE layer's experts, the k it is routed to).
  """
  from lcr import moe   # pylint: disable=import-outside-toplevel  (the model room imports JAX)
  return 6.0 * moe.active_params(cfg, num_params) + 6.0 * cfg.num_layers * seq_len * cfg.d_model


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class Progress:
  """Throughput and ETA from wall time between logged steps (the first interval includes compilation)."""

  def __init__(self, total_steps: int, start_step: int, tokens_per_step: int):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._start_step, self._start_time = None, None

  def tick(self, step: int) -> dict[str, float]:
    """Timing metrics for the steps since the previous tick."""
    now = time.perf_counter()
    dt = max(now - self._last_time, 1e-9)
    steps = step - self._last_step
    if self._start_time is None:   # measure the ETA from after the first (compiling) interval
      self._start_step, self._start_time = step, now
      rate = steps / dt
    else:
      rate = (step - self._start_step) / max(now - self._start_time, 1e-9)
    self._last_step, self._last_time = step, now
    return {'tokens_per_s': steps * self.tokens_per_step / dt, 'step_time_s': dt / max(steps, 1),
            'eta_s': (self.total_steps - step) / rate if rate > 0 else math.inf}

  def pause(self, step: int) -> None:
    """Leaves the time since the last tick (evaluation, checkpointing) out of the next throughput."""
    self._last_step, self._last_time = step, time.perf_counter()

  def line(self, step: int, m: dict[str, Any]) -> str:
    parts = [f'step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)']
    if 'loss' in m:
      parts.append(f'loss {m["loss"]:.4f}  lr {m["lr"]:.3g}  |g| {m["grad_norm"]:.3g}')
    if 'val_loss' in m:
      parts.append(f'val_loss {m["val_loss"]:.4f}')
    if 'tokens_per_s' in m:
      parts.append(f'{m["tokens_per_s"]:,.0f} tok/s')
    if 'mfu' in m:
      parts.append(f'MFU {100 * m["mfu"]:.1f}%')
    if 'eta_s' in m and math.isfinite(m['eta_s']):
      parts.append(f'ETA {format_duration(m["eta_s"])}')
    return '  '.join(parts)


class MetricWriter:
  """Appends one JSON object per logged step to workdir/metrics.jsonl, mirrored to TensorBoard.

  Resuming from a checkpoint at step S first drops the lines after S (the resumed run writes
  them again), so the file always describes one consistent run.
  """

  def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(self.path):
      keep = [line for line in read_metrics(self.path) if line['step'] <= resume_step]
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in keep)
      os.replace(tmp, self.path)
    self._file = open(self.path, 'a')
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported here: only the writing process needs it
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _plain(v: Any) -> Any:
  return v.item() if hasattr(v, 'item') else v


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl (a workdir or the file itself); a torn last line is skipped."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return records
