"""lcr.host_memory: a process that imported lcr reuses the host memory its last step freed."""

import os
import platform
import subprocess
import sys

import pytest

from lcr import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'

# A fresh process (lcr imported before XLA starts its threads) runs a jitted step whose 64 MiB
# result is dropped after each call, and prints the page faults a call costs once warm: the fewest
# over five windows of five calls. The runtime frees results a few calls late, so the heap grows
# for the first few calls (up to ~10), and on a busy machine now and then later (a window that
# sets a new peak faults on its pages once); a heap that is returned faults on every call.
FAULTS_PER_CALL = """
import resource
import lcr
import jax, jax.numpy as jnp
step = jax.jit(lambda x: x * 2.0)
x = jnp.ones((16 * 1024 * 1024,), jnp.float32)
for _ in range(15):
  step(x).block_until_ready()
fewest = float('inf')
for _ in range(5):
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    step(x).block_until_ready()
  fewest = min(fewest, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 5)
print(fewest)
"""
PAGES = 64 * 1024 * 1024 // 4096


def faults_per_call(retain: str) -> float:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **{host_memory.ENV: retain})
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', FAULTS_PER_CALL], env=env, capture_output=True,
                       text=True, check=True, cwd=ROOT)
  return float(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason='the settings are glibc malloc\'s')
def test_a_step_reuses_the_memory_the_last_one_freed():
  kept, returned = faults_per_call('1'), faults_per_call('0')
  # Without the settings every call maps its result afresh and faults on each of its pages.
  assert returned > PAGES / 2, returned
  assert kept < PAGES / 20, (kept, returned)


def test_the_environment_variable_turns_it_off(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, '0')
  assert not host_memory.enabled()
  assert host_memory.retain_freed_memory() is False
  monkeypatch.setenv(host_memory.ENV, '1')
  assert host_memory.enabled()
  assert host_memory.retain_freed_memory() is GLIBC
