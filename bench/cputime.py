"""CPU time of this process and all its descendants (a local Ray cluster's processes, say)."""

from __future__ import annotations

import psutil


def tree_cpu_seconds() -> float:
    """User and system CPU seconds of this process and every live descendant."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total
