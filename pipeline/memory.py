"""Memory of CPU replicas: the allocator settings their processes start with, and the heap trimming
between calls that keeps those settings from growing the heap without bound. Pure: no Ray, no torch.

Why (docs/design.md, "Memory on CPU replicas"): with glibc's defaults every block over 32 MiB is
mapped afresh and given back, so each large activation of a CPU forward pass is paid for again in
page faults; keeping the heap avoids that, and trimming it after each call bounds what it holds.
oneDNN and ideep cache what they build per matmul shape, and nearly every batch has new shapes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# Read when a process starts (glibc) or when a library first needs them, so they are given to a
# replica's process, never set in a running one (mallopt later misses the threads' arenas).
CPU_REPLICA_ENV = {
    "MALLOC_ARENA_MAX": "1",  # one heap for all threads: a thread's own arena maps large blocks anyway
    "MALLOC_MMAP_THRESHOLD_": str(2**31 - 1),  # keep large blocks in the heap: no page faults per forward
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),  # the heap shrinks only when release_free_heap says so
    "MALLOC_TOP_PAD_": str(256 << 20),
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",  # shapes rarely repeat: a small cache hits as often
    "LRU_CACHE_CAPACITY": "64",  # ideep's cache, likewise
}


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``); return whether
    this C library can (musl and macOS have no such call)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` while the block runs (for child processes started in it,
    e.g. Ray's), restored afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
