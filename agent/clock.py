"""The one clock: where code that waits reads the time, so tests can replace it.

Coordination primitives, rate limiters and human-input timeouts never call ``time`` or
``asyncio.sleep`` directly: they ask a :class:`Clock`. :class:`SystemClock` is the real
one; :class:`FakeClock` is a test double whose time only moves when told to
(``advance``) or, inside ``autojump()``, whenever every task of the loop is waiting,
so a test that simulates an hour of rate limiting finishes in milliseconds. Code that
only reads the time (the engine, the pool, the metrics collector) takes a plain
``() -> float`` instead; a ``FakeClock`` is one too.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Monotonic and wall time with matching sleeps."""

    def monotonic(self) -> float: ...

    def time(self) -> float:
        """Wall-clock time (seconds since the epoch), for timestamps people read."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``monotonic()`` reaches ``deadline``."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock for tests: time stands still until advanced.

    ``await advance(dt)`` fires every sleeper due within ``dt`` in deadline order,
    letting the loop run between firings. ``async with autojump():`` runs a driver
    that jumps to the next deadline each time the loop has nothing else to run; use
    it for in-process workloads only (it cannot see a wait on real I/O).
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._new_timer: asyncio.Event | None = None

    EPOCH = 1_800_000_000.0
    """What ``time()`` reads when ``monotonic()`` reads 0."""

    def monotonic(self) -> float:
        return self._now

    __call__ = monotonic

    def time(self) -> float:
        return self.EPOCH + self._now

    async def sleep_until(self, deadline: float) -> None:
        await self.sleep(deadline - self._now)

    async def sleep(self, seconds: float) -> None:
        if not seconds > 0:  # also catches NaN
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = self._now + seconds if math.isfinite(seconds) else math.inf
        heapq.heappush(self._timers, (deadline, next(self._seq), fut))
        if self._new_timer is not None:
            self._new_timer.set()
        await fut

    def pending(self) -> int:
        """How many sleepers are waiting on this clock."""
        return sum(1 for _, _, fut in self._timers if not fut.done())

    def next_deadline(self) -> float | None:
        """The earliest deadline of a live sleeper, or None."""
        self._drop_dead()
        return self._timers[0][0] if self._timers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking sleepers on the way."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards (advance({seconds}))")
        target = self._now + seconds
        await settle()
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            self._fire_due(deadline)
            await settle()
        self._now = max(self._now, target)
        await settle()

    @contextlib.asynccontextmanager
    async def autojump(self) -> AsyncIterator[None]:
        """Jump to the next deadline whenever the loop is idle, for the block's duration."""
        self._new_timer = asyncio.Event()
        driver = asyncio.get_running_loop().create_task(self._drive(self._new_timer))
        try:
            yield
        finally:
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driver
            self._new_timer = None

    async def _drive(self, new_timer: asyncio.Event) -> None:
        while True:
            await settle()
            deadline = self.next_deadline()
            if deadline is None or math.isinf(deadline):
                new_timer.clear()
                await new_timer.wait()
                continue
            self._fire_due(deadline)

    def _drop_dead(self) -> None:
        while self._timers and self._timers[0][2].done():
            heapq.heappop(self._timers)

    def _fire_due(self, deadline: float) -> None:
        self._now = max(self._now, deadline)
        while self._timers and self._timers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._timers)
            if not fut.done():
                fut.set_result(None)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now:g}, pending={self.pending()})"


async def settle(max_rounds: int = 10_000) -> None:
    """Yield to the loop until no other callback is ready to run.

    The stdlib loop keeps its runnable callbacks in ``_ready``; when that attribute is
    missing (another loop implementation) a fixed number of rounds is used instead.
    """
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    if ready is None:
        for _ in range(256):
            await asyncio.sleep(0)
        return
    for _ in range(max_rounds):
        await asyncio.sleep(0)
        if not ready:
            return


async def wait_until_done(clock: Clock, fut: asyncio.Future[object], timeout: float) -> bool:
    """Wait for ``fut`` for at most ``timeout`` seconds of ``clock``; True when it is done.

    Never cancels ``fut`` on timeout; if the caller is cancelled, ``fut`` is left as it
    is too, so the caller decides what a grant that raced its cancellation means.
    """
    if fut.done():
        return True
    if math.isinf(timeout):
        await asyncio.wait((fut,))
        return True
    if timeout <= 0:
        return fut.done()
    sleeper = asyncio.get_running_loop().create_task(clock.sleep(timeout))
    try:
        await asyncio.wait((fut, sleeper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
    return fut.done()
