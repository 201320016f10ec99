"""A fake clock for human-input timeouts: time moves only when a test advances it."""

from __future__ import annotations

import asyncio

import pytest


class FakeClock:
    """``monotonic()`` starts at 0 and moves only on ``advance``; sleepers wake then."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def time(self) -> float:
        return 1_800_000_000.0 + self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep_until(self, deadline: float) -> None:
        if self.now >= deadline:
            return
        entry = (deadline, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, future in self._sleepers:
            if deadline <= self.now and not future.done():
                future.set_result(None)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
