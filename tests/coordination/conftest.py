"""Fixtures: a fake clock, a coordinator on it, and a check that no task is left behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent.clock import FakeClock, settle
from agent.coordination.coordinator import Coordinator


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def coordinator(clock: FakeClock) -> AsyncIterator[Coordinator]:
    coord = Coordinator(clock)
    yield coord
    await coord.aclose()


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Every test must finish the tasks it started (waiters, reapers, watchers)."""
    before = asyncio.all_tasks()
    yield
    await settle()
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    for task in left:
        task.cancel()
    assert not left, f"tasks left running: {left}"
