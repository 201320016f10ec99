"""Test doubles for monitoring code: a fake clock, a fake process, a hand-driven timer.

They let tests feed events stamped with a known time, read known CPU figures and fire
real-time updates one at a time, so nothing waits on the wall clock.
"""

from __future__ import annotations

import asyncio


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeProcess:
    """A :class:`~agent.monitor.process.ProcessSampler` with settable figures."""

    def __init__(self, cpu_seconds: float = 0.0, rss_bytes: int = 0) -> None:
        self.cpu = cpu_seconds
        self.rss = rss_bytes

    def cpu_seconds(self) -> float:
        return self.cpu

    def rss_bytes(self) -> int:
        return self.rss


class ManualTimer:
    """An injectable ``sleep`` that returns only when the test calls :meth:`fire`.

    ``fire`` also advances ``clock`` (when given) by the requested delay, so an update
    window has a known length.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock
        self._waiters: list[tuple[asyncio.Future[None], float]] = []
        self._changed = asyncio.Condition()

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, delay)
        self._waiters.append(entry)
        async with self._changed:
            self._changed.notify_all()
        try:
            await fut
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    @property
    def sleepers(self) -> int:
        return len(self._waiters)

    async def wait_sleeping(self, count: int = 1) -> None:
        """Wait until ``count`` tasks are asleep on this timer."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._waiters) >= count)

    def fire(self) -> int:
        """Wake every sleeper (advancing the clock by the longest delay); returns how many."""
        waiters, self._waiters = self._waiters, []
        if self.clock is not None and waiters:
            self.clock.advance(max(delay for _, delay in waiters))
        for fut, _ in waiters:
            if not fut.done():
                fut.set_result(None)
        return len(waiters)
