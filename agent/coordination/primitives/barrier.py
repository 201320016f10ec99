"""BARRIER: ``max_count`` parties wait for each other, then all go on together.

A party that arrives waits until ``max_count`` parties of the same round have arrived;
then every one of them is released at once and the next round begins. If the round
does not fill within ``wait_timeout`` seconds of a party's arrival, the round is
broken: every party of it gets a CoordinationTimeoutError saying how many of how many
arrived, and the barrier starts a fresh round.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from ...errors import CoordinationError, CoordinationTimeoutError
from ..clock import Clock, wait_until_done
from .base import Primitive, PrimitiveStatistics, PrimitiveType, Waiter, check_timeout


class Barrier(Primitive):
    """A reusable rendezvous for ``max_count`` parties."""

    type = PrimitiveType.BARRIER

    def __init__(
        self,
        name: str,
        max_count: int,
        *,
        wait_timeout: float | None = None,
        ttl: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name, ttl=ttl, clock=clock)
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise CoordinationError(f"barrier {name!r}: max_count must be an int >= 1, got {max_count!r}")
        self.max_count = max_count
        self.wait_timeout = None if wait_timeout is None else check_timeout(wait_timeout, f"barrier {name!r}")
        self._round: list[Waiter] = []
        self._rounds = 0
        self._broken = 0

    @property
    def arrived(self) -> int:
        """Parties waiting in the current round."""
        return len(self._round)

    async def wait(self, owner: str, timeout: float | None = None) -> int:
        """Arrive and wait for the round to fill; returns this party's arrival index (0-based)."""
        if not isinstance(owner, str) or not owner:
            raise CoordinationError(f"barrier {self.name!r}: the owner must be a non-empty string, got {owner!r}")
        limit = check_timeout(self.wait_timeout if timeout is None else timeout, f"barrier {self.name!r}")
        index = len(self._round)
        waiter = Waiter(owner, 1.0, self.clock.monotonic(), asyncio.get_running_loop().create_future())
        self._round.append(waiter)
        self._counters.acquisitions += 1
        if len(self._round) >= self.max_count:
            self._release_round()
            return index
        fut = waiter.future
        try:
            if not await wait_until_done(self.clock, fut, limit):
                self._break_round(limit)
            fut.result()
        except BaseException:
            if not fut.done():
                fut.cancel()
            if waiter in self._round:
                self._round.remove(waiter)
            raise
        return index

    async def acquire(self, owner: str, amount: float = 1.0, timeout: float | None = None) -> None:
        """Same as :meth:`wait` (so a barrier can guard a state like the other primitives)."""
        await self.wait(owner, timeout)

    def release(self, owner: str, amount: float | None = None) -> bool:
        """A barrier holds nothing after it opens; nothing to give back."""
        return False

    def owners(self) -> list[str]:
        return []

    def waiters(self) -> list[Waiter]:
        return [w for w in self._round if not w.future.done()]

    def fail_waiter(self, owner: str, error: BaseException) -> bool:
        for waiter in self._round:
            if waiter.owner == owner and not waiter.future.done():
                waiter.future.set_exception(error)
                self._round.remove(waiter)
                self._counters.deadlock_failures += 1
                return True
        return False

    def reset(self) -> None:
        waiters, self._round = self._round, []
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(
                    CoordinationError(f"barrier {self.name!r} was reset while {waiter.owner!r} waited at it")
                )

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_count": self.max_count, "wait_timeout": self.wait_timeout}

    def statistics(self) -> PrimitiveStatistics:
        c = self._counters
        return PrimitiveStatistics(
            name=self.name,
            type=self.type,
            state="waiting" if self._round else "open",
            owners=(),
            wait_count=len(self.waiters()),
            capacity=float(self.max_count),
            in_use=float(len(self._round)),
            ttl=self.ttl,
            acquisitions=c.acquisitions,
            timeouts=c.timeouts,
            expirations=c.expirations,
            deadlock_failures=c.deadlock_failures,
        )

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(arrived=len(self._round), max_count=self.max_count, rounds=self._rounds, broken=self._broken)
        return out

    def _release_round(self) -> None:
        waiters, self._round = self._round, []
        self._rounds += 1
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_result(None)

    def _break_round(self, limit: float) -> None:
        waiters, self._round = self._round, []
        arrived = len(waiters)
        self._broken += 1
        self._counters.timeouts += 1
        shown = "forever" if math.isinf(limit) else f"{limit:g}s"
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(
                    CoordinationTimeoutError(
                        f"barrier {self.name!r}: only {arrived} of {self.max_count} parties arrived "
                        f"within {shown}; make sure {self.max_count} states reach it, "
                        "or lower max_count / raise wait_timeout"
                    )
                )
