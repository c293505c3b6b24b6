"""glibc's own allocator calls, where the process has glibc: the heap's free pages handed
back (`trim_heap`, for `prepare`'s tokenize workers), and the lookup plan/malloc.py's
`tune_malloc` shares. Here, below both, because data/ may not import plan/."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def glibc_function(name: str):
    """glibc's function `name`, or None off Linux / without glibc (musl has no mallopt
    nor malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = glibc_function("malloc_trim")


def trim_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim(0)`); True if
    any were. glibc returns freed memory on its own only from the top of the heap: pages
    freed below a block still in use stay resident, so a long-lived process that
    allocates and frees in bursts (a `prepare` tokenize worker: each batch's encodings)
    keeps its largest burst's pages and, as the live blocks scatter, ever more.
    `malloc_trim` releases every whole free page of every arena (glibc >= 2.8). No-op
    without glibc."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False
