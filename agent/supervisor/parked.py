"""The zygote's parked children as the supervisor sees them: each waits in a cgroup of its own.

The zygote forks children ahead and parks them (:mod:`agent.runtime.zygote`); it tells
the supervisor each one's pid. The supervisor then makes a fresh cgroup for each, in
every controller an attempt may need and with no limits yet, and moves the child in,
on the confiner's own thread: moving a process between cgroups waits for a kernel RCU
grace period (a millisecond or more on a busy machine), which is then paid while the
child waits rather than while a state does. A launch takes the oldest ready child,
writes the attempt's limits into its cgroup and has the zygote hand it the spec.

A cgroup made for a parked child is never given to anyone else: it is removed with the
child, whether the child served an attempt or was let go. Each ``process`` attempt
still gets a fresh process that ran no state, in a fresh cgroup that held no other.
Children parked for sandboxed launches (each PID 1 of a namespace of its own) are kept
apart: a sandboxed launch takes only one of those, any other launch only another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .cgroups import CgroupHandle
from .confinement import Confiner


class ParkedChildren:
    """Ready parked children (pid, cgroup), oldest first, and those whose cgroup is being made."""

    def __init__(self, confiner: Confiner, loop: Callable[[], asyncio.AbstractEventLoop | None], log: Any) -> None:
        self._confiner = confiner
        self._loop = loop
        self._log = log
        self._ready: dict[bool, dict[int, CgroupHandle | None]] = {False: {}, True: {}}  # by sandboxed
        self._sandboxed: dict[int, bool] = {}  # pid -> parked for a sandboxed launch, while being made
        self._making: set[int] = set()
        self._gone: set[int] = set()  # went away while their cgroup was being made
        self._closed = False

    def __len__(self) -> int:
        return sum(map(len, self._ready.values())) + len(self._making)

    def pids(self) -> set[int]:
        return {*self._ready[False], *self._ready[True], *self._making}

    def parked(self, pid: int, sandboxed: bool = False) -> None:
        """The zygote parked ``pid`` (for sandboxed launches or others): make its cgroup, off the event loop."""
        if self._closed:
            return
        self._making.add(pid)
        self._sandboxed[pid] = sandboxed
        self._confiner.background(lambda: self._make(pid))

    def _make(self, pid: int) -> None:  # on the confiner's thread
        try:
            handle = self._confiner.park(pid)
        except Exception as exc:
            self._log.warning("parked_child_not_confined", pid=pid, error=repr(exc))
            handle, failed = None, True
        else:
            failed = False
        loop = self._loop()
        if loop is None or loop.is_closed():
            if handle is not None:
                handle.remove()
            return
        try:
            loop.call_soon_threadsafe(self._made, pid, handle, failed)
        except RuntimeError:  # the loop closed meanwhile
            if handle is not None:
                handle.remove()

    def _made(self, pid: int, handle: CgroupHandle | None, failed: bool) -> None:
        self._making.discard(pid)
        sandboxed = self._sandboxed.pop(pid, False)
        if failed or self._closed or pid in self._gone:
            self._gone.discard(pid)
            if handle is not None:
                self._confiner.background(handle.remove)
            return
        self._ready[sandboxed][pid] = handle

    def take(self, sandboxed: bool = False) -> tuple[int, CgroupHandle | None] | None:
        """The oldest ready child parked for this kind of launch and its cgroup, now the
        caller's (None: none ready)."""
        ready = self._ready[sandboxed]
        if not ready:
            return None
        pid = next(iter(ready))
        return pid, ready.pop(pid)

    def gone(self, pid: int) -> None:
        """``pid`` exited or was handed out: drop it (and remove its unused cgroup)."""
        if pid in self._making:
            self._gone.add(pid)
        for ready in self._ready.values():
            handle = ready.pop(pid, None)
            if handle is not None:
                self._confiner.background(handle.remove)

    def close(self) -> None:
        """The supervisor shuts down: the confiner reaps every cgroup left."""
        self._closed = True
        for ready in self._ready.values():
            ready.clear()
