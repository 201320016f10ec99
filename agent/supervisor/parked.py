"""The zygote's parked children as the supervisor sees them: each waits in a cgroup of its own.

The zygote forks children ahead and parks them (:mod:`agent.runtime.zygote`); it tells
the supervisor each one's pid. The supervisor then makes a fresh cgroup for each, in
every controller an attempt may need and with no limits yet, and moves the child in,
on the confiner's own thread: moving a process between cgroups waits for a kernel RCU
grace period (a millisecond or more on a busy machine), which is then paid while the
child waits rather than while a state does. A launch takes the oldest ready child,
writes the attempt's limits into its cgroup and hands it the spec itself, over the
child's socket that the zygote passed on with its report (the zygote keeps no end of
it): a launch wakes the child and nothing else. Only the supervisor hands out a parked
child or lets it go (closing its socket, when the zygote says nobody is launching), so
a child is never both.

A cgroup made for a parked child is never given to anyone else: it is removed with the
child, whether the child served an attempt or was let go. Each ``process`` attempt
still gets a fresh process that ran no state, in a fresh cgroup that held no other.
Children parked for sandboxed launches (each PID 1 of a namespace of its own) are kept
apart: a sandboxed launch takes only one of those, any other launch only another.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from .cgroups import CgroupHandle
from .confinement import Confiner


class Parked(NamedTuple):
    """A parked child ready for a launch, and what was made for it ahead."""

    pid: int
    cgroup: CgroupHandle | None
    lease: Any = None  # a sandbox uid leased for it (children parked for sandboxed launches)


class ParkedChildren:
    """Ready parked children, oldest first, and those whose cgroup is being made.

    A child parked for sandboxed launches also gets its sandbox uid leased ahead (leasing
    takes and writes a lock file: half a millisecond that no launch then waits for); a
    lease nobody used is released with the child, and one that a launch short of uids
    took over meanwhile is not the child's any more (:meth:`~agent.supervisor.sandbox.UidPool.claim`).
    """

    def __init__(self, confiner: Confiner, loop: Callable[[], asyncio.AbstractEventLoop | None], log: Any) -> None:
        self._confiner = confiner
        self._loop = loop
        self._log = log
        self._ready: dict[bool, dict[int, Parked]] = {False: {}, True: {}}  # by sandboxed
        self._making: set[int] = set()
        self._gone: set[int] = set()  # went away while their cgroup was being made
        self._sockets: dict[int, socket.socket] = {}  # each parked child's socket, until it is handed out
        # Cgroups made on the confiner's thread, to be taken in on the loop (see settle).
        self._made_ahead: deque[tuple[Parked, bool, bool]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return sum(map(len, self._ready.values())) + len(self._making)

    def pids(self) -> set[int]:
        return {*self._ready[False], *self._ready[True], *self._making}

    def parked(self, pid: int, sandboxed: bool = False, sock: socket.socket | None = None) -> None:
        """The zygote parked ``pid`` (for sandboxed launches or others) and passed on ``sock``,
        the child's socket: make its cgroup, off the event loop."""
        if self._closed:
            if sock is not None:
                sock.close()  # the child exits
            return
        if sock is not None:
            self._sockets[pid] = sock
        self._making.add(pid)
        self._confiner.background(lambda: self._make(pid, sandboxed))

    def _make(self, pid: int, sandboxed: bool) -> None:  # on the confiner's thread
        lease = None
        try:
            handle = self._confiner.park(pid, sandboxed)
        except Exception as exc:
            # Else it was let go meanwhile, or the supervisor shut down (its zygote removes
            # the supervisor's cgroups as it exits): nothing went wrong.
            if not isinstance(exc.__cause__, ProcessLookupError) and not self._closed:
                self._log.warning("parked_child_not_confined", pid=pid, error=repr(exc))
            handle, failed = None, True
        else:
            failed = False
            if sandboxed and handle is not None:
                lease = self._confiner.lease_ahead(pid)
        self._made_ahead.append((Parked(pid, handle, lease), sandboxed, failed))
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.settle)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._closed:
            self.settle()  # nothing will: close() has settled what came before

    def settle(self) -> None:
        """Take in the children whose cgroup is made: ready for a launch, or dropped.

        Asked of the loop the supervisor serves when a cgroup is made, and called again when
        the supervisor serves another loop: a loop that stopped before running that call
        (an ``asyncio.run`` that returned) would otherwise keep the child waiting for good,
        counted by the zygote as parked, in a cgroup nobody removes."""
        while self._made_ahead:
            try:
                made, sandboxed, failed = self._made_ahead.popleft()
            except IndexError:  # the other thread took the last one
                return
            self._made(made, sandboxed, failed)

    def _made(self, made: Parked, sandboxed: bool, failed: bool) -> None:
        pid = made.pid
        self._making.discard(pid)
        if failed or self._closed or pid in self._gone:
            self._gone.discard(pid)
            self.drop(made)
            return
        self._ready[sandboxed][pid] = made

    def take(self, sandboxed: bool = False) -> Parked | None:
        """The oldest ready child parked for this kind of launch, now the caller's (None: none ready)."""
        ready = self._ready[sandboxed]
        if not ready:
            return None
        return ready.pop(next(iter(ready)))

    def take_socket(self, pid: int) -> socket.socket | None:
        """Parked child ``pid``'s socket, now the caller's, to hand it its spec (None: none came)."""
        return self._sockets.pop(pid, None)

    def let_go(self, pids: list[int]) -> None:
        """Let the children among ``pids`` that no launch took go: each exits when its socket
        closes (its exit then drops it). One taken already serves its launch."""
        untaken = self.pids()
        for pid in pids:
            if pid in untaken:
                sock = self._sockets.pop(pid, None)
                if sock is not None:
                    sock.close()

    def gone(self, pid: int) -> None:
        """``pid`` exited: drop it (and what was made for it, unused)."""
        sock = self._sockets.pop(pid, None)
        if sock is not None:
            sock.close()
        if pid in self._making:
            self._gone.add(pid)
        for ready in self._ready.values():
            made = ready.pop(pid, None)
            if made is not None:
                self.drop(made)

    def drop(self, made: Parked) -> None:
        """Remove the cgroup made for a parked child (which takes the child with it) and
        release its uid, off the event loop."""
        self._confiner.background(lambda: self._confiner.let_go(made))

    def forget_after_fork(self) -> None:
        """In a process forked from the supervisor's: close the copies of the parked children's
        sockets (only the copies), which would keep each child parked after the supervisor
        lets it go, for as long as the forked process lives."""
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def close(self) -> None:
        """The supervisor shuts down: each ready child's cgroup is removed like that of any
        child let go, so that its files (opened at park time) are closed and its uid
        released; children whose cgroup is still being made are let go when it is."""
        self._closed = True
        self._close_sockets()
        self.settle()  # each dropped
        for ready in self._ready.values():
            for made in ready.values():
                self.drop(made)
            ready.clear()
