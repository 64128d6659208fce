"""Resident memory: read it, and keep glibc from holding on to what requests freed.

Large transient buffers (upload bodies, decoded images) are allocated and freed all the time.
glibc raises its mmap threshold after such frees, so later buffers come from the heap and the
freed pages stay resident; one arena per thread multiplies that. Fixing the threshold and
capping the arenas keeps the resident size near what is live.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3


def limit_malloc(mmap_threshold: int = 256 * 1024, arenas: int = 2) -> bool:
    """Best effort on glibc (Linux); elsewhere a no-op. True if applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """The process's resident set now (VmRSS), or None where /proc is not there."""
    return _status("VmRSS")


def peak_resident_bytes() -> int | None:
    """The highest resident set so far (VmHWM)."""
    return _status("VmHWM")
