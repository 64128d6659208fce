"""How many cores this process may use: the one answer every stage's thread settings start from."""

from __future__ import annotations

import os
from pathlib import Path


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask and a cgroup v2 CPU quota, not the
    machine's count (threads that outnumber the cores spin against each other and slow
    training many times over)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)
