"""The supervisor's budget of open files: a large fan-out waits for room instead of failing.

While a state's process runs, the supervisor holds a few descriptors for it (its output
pipe, its log, its connection, its cgroup's files when they are read back); a worker
holds about forty for its whole life (most of them its cgroup's files, kept open: a read
of one then costs a ``pread``), and so does a parked child, for its cgroup made ahead.
At the usual soft limit of 1,024 open files a fan-out of a few hundred process states ran
out, and a ZeroMQ socket that cannot accept a connection aborts the whole program. So:

* the first supervisor of a process raises the process's soft limit of open files to its
  hard limit (nothing here uses ``select()``, which needs descriptors below 1,024), and
  every state process and worker gets the original soft limit back, as it would have
  had without us;
* state processes and workers run at most as many at once as that limit leaves room for
  (:class:`Budget`); the others wait for one to end, in the order they came.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

PER_CHILD = 8
"""Descriptors a running process or sandbox state costs the supervisor, at its most."""
PER_WORKER = 40
"""Descriptors a live worker costs the supervisor (36 measured on cgroup v1)."""
PER_PARKED = 30
"""Descriptors a parked child's cgroup costs the supervisor (about 25 measured on cgroup v1)."""
HEADROOM = 64
"""Left for the supervisor's own sockets and for files the application opens later."""
_MOST = 1 << 20  # the kernel's default nr_open: a soft limit above it is refused
_original: int | None = None  # the soft limit before the first raise


def raise_soft_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the soft
    limit it had before the first raise (what its state processes get back)."""
    global _original
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _original is None:
        _original = soft
    target = _MOST if hard == resource.RLIM_INFINITY else min(hard, _MOST)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            pass  # a lower nr_open: the limit stays, and the budget follows it
    return _original


def open_now() -> int:
    """Descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@dataclass(frozen=True)
class Budget:
    """How many state processes (``children``) and workers may be live at once.

    Two thirds of what the soft limit leaves above the descriptors open now (and
    :data:`HEADROOM`, and what ``parked`` children may hold, up to a quarter of it) go to
    state processes, a third to workers; at least one of each.
    """

    children: int
    workers: int

    @classmethod
    def of(cls, soft_limit: int, in_use: int, parked: int = 0) -> "Budget":
        if soft_limit == resource.RLIM_INFINITY:
            soft_limit = _MOST
        usable = max(0, soft_limit - in_use - HEADROOM)
        usable -= min(parked * PER_PARKED, usable // 4)  # under a small limit, PER_CHILD's slack covers them
        return cls(children=max(1, usable * 2 // 3 // PER_CHILD), workers=max(1, usable // 3 // PER_WORKER))

    @classmethod
    def now(cls, parked: int = 0) -> "Budget":
        """The budget under this process's soft limit of open files, as it is now, with
        at most ``parked`` children parked ahead."""
        return cls.of(resource.getrlimit(resource.RLIMIT_NOFILE)[0], open_now(), parked)
