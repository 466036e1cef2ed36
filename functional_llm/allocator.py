"""Keep freed CPU memory for reuse: an explicit, process-wide opt-in for pure training steps.

A pure step (no donation) writes its new parameters and optimizer moments into fresh memory
every step. glibc's ``malloc`` serves a block above its *mmap threshold* (at most 32 MiB by
default) with a fresh ``mmap`` and hands it back to the kernel on ``free``; every step then
first-touches its new tensors page by page, and on CPU those page faults, not the arithmetic,
dominate the update (``benchmarks/optim.py``). :func:`retain_freed_memory` raises the mmap and
trim thresholds, so a freed block stays in the heap and the next step's tensors reuse it,
as jemalloc, tcmalloc and PyTorch's CUDA caching allocator already do.

It is the same as starting Python with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
set, for a process already running (a notebook). It changes the whole process, and only what
is allocated after the call: call it once, at startup. The price is memory: what a step frees
stays in the process (resident) instead of going back to the system, so the resident size
stays near its peak. Where ``malloc`` is not glibc's (macOS, Windows, musl) it does nothing
and returns False. Nothing in the library calls it.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["glibc", "retain_freed_memory"]

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(limit: int = 1 << 30) -> bool:
    """Serve allocations up to ``limit`` bytes (default 1 GiB) from the heap and keep up to
    ``2 * limit`` bytes of freed memory in it, with glibc's ``mallopt``; True if applied.

    ``limit`` bounds the largest tensor that is recycled: a params-sized block above it still
    comes from ``mmap`` each time. Where glibc refuses a value (older versions cap the mmap
    threshold at 32 MiB) this raises ``ValueError``."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 2**30:
        # mallopt takes a C int, and the trim threshold is 2 * limit
        raise ValueError(
            f"retain_freed_memory: limit must be an int of bytes in (0, 2**30], got {limit!r}"
        )
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for name, param, value in (("mmap threshold", _M_MMAP_THRESHOLD, limit),
                               ("trim threshold", _M_TRIM_THRESHOLD, 2 * limit - 1)):  # fmt: skip
        if mallopt(param, value) != 1:
            raise ValueError(f"retain_freed_memory: glibc refused {value:,} bytes as its {name}")
    return True


def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (Linux), else None: where
    :func:`retain_freed_memory` applies."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None
