"""The wait queue: priority order, first come first served within a priority, safe backfill."""

from __future__ import annotations

import asyncio

import pytest

from agent.errors import ResourceError, ResourceRequestError
from agent.resources import Priority, ResourcePool, ResourceType

from .helpers import req


def pool4() -> ResourcePool:
    return ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0)


class TestFifoWithinPriority:
    """Requests of one priority are granted in arrival order."""

    def test_arrival_order(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        for name in ("a", "b", "c", "d"):
            pool.enqueue(name, req(cpu=1))
        assert pool.grant_next() == []
        pool.release("hog")
        assert pool.grant_next() == ["a", "b", "c", "d"]

    def test_small_request_does_not_overtake_big_head(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=3))
        pool.enqueue("big", req(cpu=4))
        pool.enqueue("small", req(cpu=1))  # would fit now, but "big" came first
        assert pool.grant_next() == []
        assert pool.available(ResourceType.CPU) == 1
        pool.release("hog")
        assert pool.grant_next() == ["big"]
        pool.release("big")
        assert pool.grant_next() == ["small"]

    def test_try_acquire_queues_behind_a_blocked_head(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=3))
        pool.enqueue("big", req(cpu=4))
        assert not pool.try_acquire("late", req(cpu=1))
        assert pool.try_acquire("urgent", req(cpu=1, priority=Priority.HIGH))

    def test_enqueue_grants_at_once_when_it_fits(self) -> None:
        pool = pool4()
        pool.enqueue("a", req(cpu=1))
        assert pool.grant_next() == ["a"]
        assert pool.get_state_allocations()["a"] == {ResourceType.CPU: 1.0}

    def test_front_goes_before_its_level(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        pool.enqueue("a", req(cpu=4))
        pool.enqueue("victim", req(cpu=4), front=True)
        pool.release("hog")
        assert pool.grant_next() == ["victim"]
        assert pool.queued() == ["a"]


class TestPriorityOrder:
    """Higher priorities are served first; lower ones only backfill what is left over."""

    def test_higher_first(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        pool.enqueue("low", req(cpu=4, priority=Priority.LOW))
        pool.enqueue("normal", req(cpu=4, priority=Priority.NORMAL))
        pool.enqueue("critical", req(cpu=4, priority=Priority.CRITICAL))
        pool.enqueue("high", req(cpu=4, priority=Priority.HIGH))
        assert pool.queued() == ["critical", "high", "normal", "low"]
        order = []
        holder = "hog"
        for _ in range(4):
            pool.release(holder)
            (holder,) = pool.grant_next()
            order.append(holder)
        assert order == ["critical", "high", "normal", "low"]

    def test_backfill_uses_only_what_blocked_heads_leave(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=2, memory=500))
        pool.enqueue("high", req(cpu=1, memory=800, priority=Priority.HIGH))  # short of memory
        # CPU: 2 free, "high" needs 1 of it: 1 left for backfill. Memory: none may be used.
        pool.enqueue("low-mem", req(cpu=1, memory=10, priority=Priority.LOW))
        pool.enqueue("low-cpu", req(cpu=1, priority=Priority.LOW))
        assert pool.grant_next() == []  # low-mem heads LOW and is blocked; FIFO keeps low-cpu behind
        pool.cancel("low-mem")
        assert pool.grant_next() == ["low-cpu"]
        assert not pool.try_acquire("low-2", req(cpu=1, priority=Priority.LOW))  # would eat high's CPU
        pool.release("hog")
        assert pool.grant_next() == ["high"]

    def test_backfill_never_delays_the_blocked_head(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=3))
        pool.enqueue("high", req(cpu=2, priority=Priority.HIGH))
        pool.enqueue("low", req(cpu=1, priority=Priority.LOW))
        assert pool.grant_next() == []  # 1 free, all of it set aside for "high"
        pool.release("hog")
        assert pool.grant_next() == ["high", "low"]


    def test_backfill_never_delays_the_requests_behind_a_blocked_head(self) -> None:
        # Two HIGH requests wait for memory; a LOW one that fits past the first would hold
        # the CPU the second needs once memory frees.
        pool = pool4()
        pool.try_acquire("hog", req(cpu=2, memory=1000))
        pool.enqueue("high-1", req(cpu=1, memory=100, priority=Priority.HIGH))
        pool.enqueue("high-2", req(cpu=1, memory=100, priority=Priority.HIGH))
        pool.enqueue("low", req(cpu=1, priority=Priority.LOW))
        assert pool.grant_next() == []  # 2 CPUs free, both set aside for the HIGH requests
        assert not pool.try_acquire("low-2", req(cpu=1, priority=Priority.LOW))
        assert "2 set aside for higher priorities" in pool.get_waiting_states()["low"]
        pool.release("hog")
        assert pool.grant_next() == ["high-1", "high-2", "low"]


class TestCancel:
    """cancel withdraws a queued request and lets the ones behind it move up."""

    def test_cancel_head_unblocks(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=3))
        pool.enqueue("big", req(cpu=4))
        pool.enqueue("small", req(cpu=1))
        assert pool.cancel("big")
        assert pool.grant_next() == ["small"]
        assert not pool.cancel("big")

    def test_release_withdraws_queued_request(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        pool.enqueue("a", req(cpu=1))
        pool.release("a")
        assert pool.statistics().waiting == 0
        pool.enqueue("a", req(cpu=1))  # may queue again
        assert pool.queued() == ["a"]

    def test_double_enqueue_is_an_error(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        pool.enqueue("a", req(cpu=1))
        with pytest.raises(ResourceRequestError, match="already queued"):
            pool.enqueue("a", req(cpu=1))
        with pytest.raises(ResourceRequestError, match="already holds"):
            pool.enqueue("hog", req(cpu=1))


class TestAsyncAcquire:
    """acquire waits its turn; allocate holds for a block, like a capacity limiter."""

    async def test_acquire_waits_for_release(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        task = asyncio.create_task(pool.acquire("a", req(cpu=2)))
        await asyncio.sleep(0)
        assert not task.done()
        assert pool.queued() == ["a"]
        pool.release("hog")
        await task
        assert "a" in pool.get_state_allocations()
        assert pool.grant_next() == []  # delivered to the awaiting task, not the outbox

    async def test_allocate_releases_on_exit(self) -> None:
        pool = pool4()
        async with pool.allocate("a", req(cpu=4)) as held:
            assert held is pool
            assert pool.available(ResourceType.CPU) == 0
        assert pool.available(ResourceType.CPU) == 4

    async def test_allocate_releases_on_error(self) -> None:
        pool = pool4()
        with pytest.raises(KeyError):
            async with pool.allocate("a", req(cpu=4)):
                raise KeyError("boom")
        assert pool.statistics().holders == 0

    async def test_cancelled_waiter_leaves_the_queue(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        task = asyncio.create_task(pool.acquire("a", req(cpu=4)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.queued() == []
        pool.release("hog")
        assert pool.statistics().holders == 0

    async def test_cancelled_after_grant_gives_it_back(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        task = asyncio.create_task(pool.acquire("a", req(cpu=4)))
        await asyncio.sleep(0)
        pool.release("hog")  # grants "a" before its task runs again
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.statistics().holders == 0
        assert pool.available(ResourceType.CPU) == 4

    async def test_cancel_fails_the_waiting_acquire(self) -> None:
        pool = pool4()
        pool.try_acquire("hog", req(cpu=4))
        task = asyncio.create_task(pool.acquire("a", req(cpu=4)))
        await asyncio.sleep(0)
        pool.cancel("a")
        with pytest.raises(ResourceError, match="was cancelled"):
            await task
