"""Process-wide tuning for the processes that move replication data (the agent, the process
server, the apply workers). Call ``tune_allocator`` once, at the start of such a process.

Those processes handle batch-sized buffers (megabytes) over and over. By default glibc maps
every allocation over 128 KiB afresh and unmaps it when freed, so each batch touches brand
new zeroed pages: on a virtual machine, first touches of memory cost about as much CPU as
AES-GCM over the same bytes. Raising the mmap threshold keeps such buffers in the heap,
where the next batch reuses them, and capping the arenas keeps each thread from holding a
high-water mark of its own, so the resident size stays near a few batches per busy thread.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_done = False


def tune_allocator(*, batch_bytes: int = 32 * 1024 * 1024) -> bool:
    """Keep buffers up to ``batch_bytes`` in the heap for reuse. Returns whether the C
    library took the settings (only glibc has them; elsewhere nothing changes)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all((
        mallopt(_M_MMAP_THRESHOLD, batch_bytes),
        mallopt(_M_TRIM_THRESHOLD, 2 * batch_bytes),
        mallopt(_M_ARENA_MAX, 2),
    ))
    _done = ok
    return ok
