"""lcr: long-context research in JAX."""

from lcr import host_memory

# Before XLA starts its threads: see lcr.host_memory.
host_memory.retain_freed_memory()
