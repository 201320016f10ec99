"""Test helpers shared by the coordination tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from agent.clock import FakeClock

T = TypeVar("T")


async def within(clock: FakeClock, seconds: float, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` under autojump; fail (instead of hanging) past ``seconds`` of fake time."""
    work = asyncio.ensure_future(awaitable)
    guard = asyncio.ensure_future(clock.sleep(seconds))
    async with clock.autojump():
        await asyncio.wait((work, guard), return_when=asyncio.FIRST_COMPLETED)
    guard.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise AssertionError(f"still running after {seconds:g} simulated seconds")
    return work.result()
