"""Host memory that XLA:CPU frees is kept for its next step instead of going back to the kernel.

Each execution of a compiled step allocates its temporaries as one buffer with ``malloc`` (35 MB
for the throughput benchmark's model a, 364 MB for model b) and frees it when the step ends.
glibc's default malloc serves a request that large with a fresh ``mmap`` — its mmap threshold is
at most 32 MB, and the arenas of the threads XLA runs on cannot grow past 64 MB — and unmaps it
on ``free``. So every step page-faults through the whole buffer again, the kernel zeroing each
page: ~9,000 faults a step for model a, ~89,000 for b, a sixth of a's step on two cores.

:func:`retain_freed_memory` sets glibc's malloc to serve every thread from the main arena (which
grows with ``brk`` without that 64 MB limit), never to ``mmap`` a request, and to give free memory
at the top of the heap back to the kernel only past 2 GiB, so a step reuses the pages of the one
before it. The cost is that the process keeps its peak heap for reuse rather than returning it.
It must run before XLA starts its threads (their first ``malloc`` picks their arena), so
``import lcr`` runs it; ``LCR_RETAIN_HOST_MEMORY=0`` in the environment turns it off. Elsewhere
than glibc it does nothing (other allocators cache large blocks their own way).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# Free memory at the top of the heap goes back to the kernel only past this many bytes: the
# largest value mallopt takes (an int), 2 GiB.
TRIM_THRESHOLD = 2 ** 31 - 1
ENV = 'LCR_RETAIN_HOST_MEMORY'


def enabled() -> bool:
  return os.environ.get(ENV, '1') not in ('0', 'false', 'False', '')


def retain_freed_memory() -> bool:
  """Set glibc's malloc to keep freed memory for reuse; True when every setting took effect."""
  if not enabled() or platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
  return all(mallopt(param, value) == 1 for param, value in settings)
