"""glibc's allocator, held steady while timing: freed memory is kept instead of handed back to the OS."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

__all__ = ["MALLOC_MODES", "set_malloc", "steady_malloc"]

MALLOC_MODES = ("steady", "default")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


def set_malloc(mode: str) -> str:
    """``steady``: make glibc keep freed memory, so a repeated call does not page-fault its output in again.

    By default glibc serves allocations above a threshold (adapting up to 32 MB) with fresh ``mmap``
    pages and hands freed heap tops back to the OS, so an op whose output is tens of MB pays
    thousands of page faults on some calls and none on others, depending on what was freed before
    it: timings then measure the allocator, not the kernel (we saw the same 1x1 convolution take
    7.7 ms or 15.3 ms). ``M_MMAP_MAX=0`` serves every allocation from the heap and a 2 GiB
    ``M_TRIM_THRESHOLD`` keeps it, as a caching allocator (jemalloc, tcmalloc, CUDA's) does.
    ``default`` restores glibc's documented defaults. Returns what is in effect, for the record.
    """
    if mode not in MALLOC_MODES:
        raise ValueError(f"unknown malloc {mode!r}; choose from: {', '.join(MALLOC_MODES)}")
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return "default (mallopt unavailable: not glibc)"
    settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1} if mode == "steady" else _GLIBC_DEFAULTS
    if not all(mallopt(param, value) for param, value in settings.items()):
        return "default (mallopt refused)"
    return "steady (glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)" if mode == "steady" else "default (glibc)"


@contextlib.contextmanager
def steady_malloc() -> Iterator[str]:
    """``set_malloc("steady")`` for the duration of a measurement, then glibc's defaults again."""
    mode = set_malloc("steady")
    try:
        yield mode
    finally:
        if mode.startswith("steady"):
            set_malloc("default")
