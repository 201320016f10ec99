"""The deadlock detector finds wait cycles and fails the youngest waiter."""

from __future__ import annotations

import asyncio

import pytest

from agent.coordination.allocation import mutex
from agent.clock import FakeClock, settle
from agent.coordination.coordinator import Coordinator
from agent.coordination.deadlock import DeadlockResolution
from agent.coordination.primitives import PrimitiveType
from agent.errors import DeadlockError

from ._support import within


async def _opposite_order(coord: Coordinator, clock: FakeClock) -> tuple[asyncio.Task, asyncio.Task]:
    """A holds m1 then wants m2; B holds m2 then wants m1 (B starts waiting last)."""
    a_has_m1, b_has_m2 = asyncio.Event(), asyncio.Event()

    async def take(
        owner: str, first: str, second: str, mine: asyncio.Event, theirs: asyncio.Event, delay: float,
    ) -> str:
        async with mutex(first, owner=owner, coordinator=coord):
            mine.set()
            await theirs.wait()
            await clock.sleep(delay)
            async with mutex(second, owner=owner, coordinator=coord):
                return f"{owner} done"

    a = asyncio.create_task(take("A", "m1", "m2", a_has_m1, b_has_m2, 0.1))
    b = asyncio.create_task(take("B", "m2", "m1", b_has_m2, a_has_m1, 0.2))
    return a, b


class TestDeadlockDetector:
    """Cycles in the wait-for graph are found once and broken."""

    async def test_detect_once_fails_the_youngest(self, coordinator: Coordinator, clock: FakeClock) -> None:
        a, b = await _opposite_order(coordinator, clock)
        await clock.advance(0.2)  # both now wait for each other
        detector = coordinator.deadlock_detector
        assert detector.cycle_count == 0
        cycles = detector.detect_once()
        assert len(cycles) == 1 and cycles[0].victim == "B"
        assert set(cycles[0].owners) == {"A", "B"}
        assert await a == "A done"
        with pytest.raises(DeadlockError, match=r"'B' waits for mutex 'm1' held by 'A'.*failing 'B', the youngest"):
            await b
        assert detector.cycle_count == 1
        assert detector.detect_once() == []
        assert coordinator.get_status()["deadlock_detector"]["cycle_count"] == 1

    async def test_background_detection_resolves_without_help(self, coordinator: Coordinator, clock: FakeClock) -> None:
        coordinator.deadlock_detector.detection_interval = 1.0
        a, b = await _opposite_order(coordinator, clock)
        results = await within(clock, 600, asyncio.gather(a, b, return_exceptions=True))
        assert results[0] == "A done" and isinstance(results[1], DeadlockError)
        assert clock.monotonic() == pytest.approx(1.1)  # one interval after the first wait (A at 0.1)
        assert coordinator.deadlock_detector.cycle_count == 1

    async def test_report_only_counts_once(self, clock: FakeClock) -> None:
        coord = Coordinator(clock, resolution=DeadlockResolution.REPORT)
        a, b = await _opposite_order(coord, clock)
        await clock.advance(0.2)
        for _ in range(3):
            assert len(coord.deadlock_detector.detect_once()) == 1
        assert coord.deadlock_detector.cycle_count == 1
        assert not a.done() and not b.done()
        coord.reset()  # the only way out: waiters fail with CoordinationError
        await asyncio.gather(a, b, return_exceptions=True)
        await coord.aclose()

    async def test_dependency_edge_closes_a_cycle(self, coordinator: Coordinator, clock: FakeClock) -> None:
        m = coordinator.add_primitive("db", PrimitiveType.MUTEX)
        await m.acquire("writer")
        reader = asyncio.create_task(m.acquire("reader"))
        await settle()
        detector = coordinator.deadlock_detector
        assert detector.detect_once() == []
        detector.add_dependency("writer", "reader", "waits for the state 'reader' to finish")
        (cycle,) = detector.detect_once()
        assert cycle.victim == "reader"  # the dependency wait cannot be failed; the mutex wait can
        with pytest.raises(DeadlockError, match="waits for 'reader'"):
            await reader
        detector.remove_dependency("writer", "reader")
        m.release("writer")

    async def test_waiters_of_a_quota_whose_other_holder_goes_on_are_no_deadlock(
        self, coordinator: Coordinator, clock: FakeClock,
    ) -> None:
        # b and c each hold 1 of 10 and want 6; a holds 6 and waits for nothing: once it
        # gives back, one of them goes on. Only when a waits on b too is it a deadlock.
        q = coordinator.add_primitive("shared", PrimitiveType.QUOTA, quota_limit=10.0)
        m = coordinator.add_primitive("lock", PrimitiveType.MUTEX)
        await q.acquire("a", 6.0)
        await q.acquire("b")
        await q.acquire("c")
        await m.acquire("b")
        waits = [asyncio.create_task(q.acquire(owner, 6.0)) for owner in ("b", "c")]
        await settle()
        detector = coordinator.deadlock_detector
        detector.resolution = DeadlockResolution.REPORT
        assert detector.find_cycles() == []
        waits.append(asyncio.create_task(m.acquire("a")))
        await settle()
        cycles = detector.find_cycles()
        assert cycles and any("a" in cycle.owners for cycle in cycles)
        coordinator.reset()
        await asyncio.gather(*waits, return_exceptions=True)

    async def test_semaphore_cycle_and_max_cycles(self, coordinator: Coordinator, clock: FakeClock) -> None:
        s = coordinator.add_primitive("pool", PrimitiveType.SEMAPHORE, max_count=2)
        m = coordinator.add_primitive("lock", PrimitiveType.MUTEX)
        await s.acquire("x")
        await s.acquire("y")
        await m.acquire("z")
        waits = [asyncio.create_task(wait) for wait in (m.acquire("x"), m.acquire("y"), s.acquire("z"))]
        await settle()
        detector = coordinator.deadlock_detector
        detector.resolution = DeadlockResolution.REPORT
        assert len(detector.find_cycles()) == 2  # x->z->x and y->z->y
        detector.max_cycles = 1
        assert len(detector.find_cycles()) == 1
        detector.resolution = DeadlockResolution.FAIL_YOUNGEST
        (cycle,) = detector.detect_once()
        assert cycle.victim == "z"  # breaking z's wait breaks both cycles
        results = await asyncio.gather(waits[2], return_exceptions=True)
        assert isinstance(results[0], DeadlockError)
        coordinator.reset()
        await asyncio.gather(*waits, return_exceptions=True)
