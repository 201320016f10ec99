"""CPU time and resident memory of this Python process, for the inline part of the metrics.

Inline states run on the scheduler's own loop, so the kernel cannot tell their CPU from
the scheduler's: the monitor reports it as ``process_CPU`` (this process as a whole,
all threads), read from the kernel's per-process CPU clock (``time.process_time``,
nanosecond resolution; psutil's figure moves in 10 ms ticks), and its resident memory
from psutil. Isolated states are measured from their cgroups, read as they run and at
their end, and reported apart (``isolated_CPU``).
"""

from __future__ import annotations

import time
from typing import Protocol


class ProcessSampler(Protocol):
    """Where the monitor reads this process's CPU time and memory (a fake in tests)."""

    def cpu_seconds(self) -> float: ...

    def rss_bytes(self) -> int: ...


class ThisProcess:
    """This process: user + system CPU time of all its threads, and its resident set size."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()

    def cpu_seconds(self) -> float:
        return time.process_time()

    def rss_bytes(self) -> int:
        return int(self._process.memory_info().rss)
