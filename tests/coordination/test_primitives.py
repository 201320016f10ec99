"""Mutex, semaphore, lease, quota and barrier under a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from agent.clock import FakeClock, settle
from agent.coordination.primitives import (
    Barrier,
    Lease,
    Mutex,
    PrimitiveType,
    Quota,
    Semaphore,
    create_primitive,
)
from agent.errors import CoordinationError, CoordinationTimeoutError


async def _hold(primitive, owner: str, clock: FakeClock, seconds: float, log: list, amount: float = 1.0) -> None:
    await primitive.acquire(owner, amount)
    log.append(("in", owner, clock.monotonic()))
    await clock.sleep(seconds)
    log.append(("out", owner, clock.monotonic()))
    primitive.release(owner)


class TestMutex:
    """One owner at a time, FIFO, and a holder that hangs loses it after the ttl."""

    def test_a_grant_on_its_way_to_another_thread_as_a_reset_comes_is_void(self) -> None:
        """The grant to a waiter on another thread's loop was queued there; a reset came
        before it arrived, and a newcomer took the mutex: both then held it."""
        import threading

        m = Mutex("m")
        assert m.try_acquire("H1")
        waiting, go_on = threading.Event(), threading.Event()
        heard: list[str] = []

        def other_thread() -> None:
            async def main() -> None:
                wait = asyncio.create_task(m.acquire("W"))
                while not m.waiters():
                    await asyncio.sleep(0)
                waiting.set()
                go_on.wait(30)  # this loop is busy: the grant waits in its queue
                try:
                    await wait
                    heard.append("granted")
                except CoordinationError as exc:
                    heard.append(str(exc))

            asyncio.run(main())

        thread = threading.Thread(target=other_thread)
        thread.start()
        assert waiting.wait(30)
        m.release("H1")  # granted to W, on its way to W's loop
        m.reset()
        assert m.try_acquire("H3")
        go_on.set()
        thread.join(30)
        assert heard == ["mutex 'm' was reset while 'W' waited for it"]
        assert m.owners() == ["H3"]

    async def test_exclusive_and_fifo(self, clock: FakeClock) -> None:
        m = Mutex("db", clock=clock)
        log: list = []
        async with clock.autojump():
            await asyncio.gather(*(_hold(m, f"o{i}", clock, 1.0, log) for i in range(5)))
        entered = [o for kind, o, _ in log if kind == "in"]
        assert entered == [f"o{i}" for i in range(5)]
        inside = 0
        for kind, _, _ in log:
            inside += 1 if kind == "in" else -1
            assert inside <= 1
        assert m.statistics().state == "unlocked"

    async def test_hanging_holder_loses_it_after_ttl(self, clock: FakeClock) -> None:
        m = Mutex("db", ttl=30.0, clock=clock)
        await m.acquire("hung")
        async with clock.autojump():
            await m.acquire("next")  # nobody releases: only the ttl can let it in
        assert clock.monotonic() == pytest.approx(30.0)
        assert m.owners() == ["next"]
        assert m.release("hung") is False  # releasing late is harmless
        assert m.statistics().expirations == 1

    async def test_wait_timeout_names_the_holder(self, clock: FakeClock) -> None:
        m = Mutex("db", clock=clock, wait_timeout=5.0)
        await m.acquire("a")
        async with clock.autojump():
            with pytest.raises(CoordinationTimeoutError, match=r"'b' waited 5s.*held by 'a'"):
                await m.acquire("b")
        assert m.statistics().wait_count == 0 and m.statistics().timeouts == 1
        m.release("a")

    async def test_not_reentrant(self, clock: FakeClock) -> None:
        m = Mutex("db", clock=clock)
        await m.acquire("a")
        with pytest.raises(CoordinationError, match="not re-entrant"):
            await m.acquire("a")
        assert m.try_acquire("b") is False
        m.release("a")
        assert m.try_acquire("b") is True

    async def test_cancelled_waiter_leaves_the_queue(self, clock: FakeClock) -> None:
        m = Mutex("db", clock=clock)
        await m.acquire("a")
        b = asyncio.create_task(m.acquire("b"))
        c = asyncio.create_task(m.acquire("c"))
        await settle()
        b.cancel()
        await settle()
        m.release("a")
        await c
        assert m.owners() == ["c"]
        assert b.cancelled()

    async def test_grant_that_races_cancellation_is_given_back(self, clock: FakeClock) -> None:
        m = Mutex("db", clock=clock)
        await m.acquire("a")
        b = asyncio.create_task(m.acquire("b"))
        await settle()
        m.release("a")  # hands the mutex to b ...
        b.cancel()  # ... which is cancelled before it runs again
        await settle()
        assert b.cancelled()
        assert m.owners() == [] and m.try_acquire("c")

    async def test_status_shape(self, clock: FakeClock) -> None:
        m = Mutex("db", clock=clock)
        await m.acquire("a")
        waiter = asyncio.create_task(m.acquire("b"))
        await settle()
        status = m.status()
        assert status["state"] == "locked" and status["owners"] == ["a"] and status["wait_count"] == 1
        stats = m.statistics()
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.state = "x"  # type: ignore[misc]
        m.release("a")
        await waiter
        m.release("b")


class TestSemaphore:
    """Never more than max_count inside, whatever the arrival pattern."""

    @pytest.mark.parametrize("seed", range(5))
    async def test_three_never_four(self, clock: FakeClock, seed: int) -> None:
        rng = random.Random(seed)
        sem = Semaphore("heavy", 3, clock=clock)
        inside = peak = 0

        async def worker(i: int) -> None:
            nonlocal inside, peak
            await clock.sleep(rng.uniform(0, 5))
            await sem.acquire(f"w{i}")
            inside += 1
            peak = max(peak, inside)
            assert len(sem.owners()) == inside <= 3
            await clock.sleep(rng.uniform(0.1, 3))
            inside -= 1
            sem.release(f"w{i}")

        async with clock.autojump():
            await asyncio.gather(*(worker(i) for i in range(30)))
        assert peak == 3
        assert sem.statistics().acquisitions == 30

    def test_needs_a_positive_count(self) -> None:
        with pytest.raises(CoordinationError, match="max_count"):
            Semaphore("s", 0)


class TestLease:
    """Time-based exclusive access: always ends after ttl unless renewed."""

    def test_needs_a_ttl(self) -> None:
        with pytest.raises(CoordinationError, match="needs a ttl"):
            Lease("batch", ttl=None)

    async def test_expires_and_renews(self, clock: FakeClock) -> None:
        lease = Lease("batch", ttl=600.0, clock=clock)
        await lease.acquire("a")
        await clock.advance(500)
        lease.renew("a")  # good until 1100
        await clock.advance(500)
        assert lease.holds("a")
        await clock.advance(100)
        assert not lease.holds("a")
        assert lease.status()["state"] == "free"
        with pytest.raises(CoordinationError, match="not held"):
            lease.renew("a")

    @pytest.mark.parametrize("ttl", [float("nan"), float("inf"), -5, 0, "600", True])
    async def test_a_renewal_needs_a_ttl_in_seconds(self, clock: FakeClock, ttl: object) -> None:
        # NaN made a lease that never ended; a negative one dropped it without a word.
        lease = Lease("batch", ttl=600.0, clock=clock)
        await lease.acquire("a")
        with pytest.raises(CoordinationError, match="lease 'batch': ttl must be"):
            lease.renew("a", ttl)  # type: ignore[arg-type]
        assert lease.expires_at("a") == 600.0
        await clock.advance(600)
        assert not lease.holds("a")

    async def test_hanging_holder_loses_it(self, clock: FakeClock) -> None:
        lease = Lease("batch", ttl=600.0, clock=clock)
        await lease.acquire("hung")
        async with clock.autojump():
            await lease.acquire("next")
        assert clock.monotonic() == pytest.approx(600.0) and lease.owners() == ["next"]


class TestQuota:
    """Amounts drawn from a limit, FIFO, reclaimed after the reset period."""

    async def test_amounts_and_fifo_head(self, clock: FakeClock) -> None:
        q = Quota("gpu_mem", 16.0, clock=clock)
        await q.acquire("a", 10.0)
        big = asyncio.create_task(q.acquire("big", 8.0))
        await settle()
        assert q.try_acquire("small", 1.0) is False  # may not overtake the queued head
        q.release("a")
        await big
        assert q.available == pytest.approx(8.0)
        q.release("big")

    async def test_more_than_the_limit_is_refused(self, clock: FakeClock) -> None:
        q = Quota("gpu_mem", 16.0, clock=clock)
        with pytest.raises(CoordinationError, match="capacity is 16"):
            await q.acquire("a", 17.0)

    async def test_more_than_is_left_beside_its_own_holding_is_refused(self, clock: FakeClock) -> None:
        # An owner that holds part of the limit and asks for more than the rest would wait
        # for itself: refused at once, saying what it may ask for, and nothing changes.
        q = Quota("pool", 100.0, clock=clock)
        await q.acquire("a", 1.0)
        with pytest.raises(CoordinationError, match="'a' holds 1 of its 100 and asks for 100 more.*at most 99"):
            await q.acquire("a", 100.0)
        with pytest.raises(CoordinationError, match="asks for 100 more"):
            q.try_acquire("a", 100.0)
        await q.acquire("a", 99.0)
        assert q.status()["in_use"] == 100.0 and q.statistics().wait_count == 0
        q.release("a")
        sem = Semaphore("one", 1, clock=clock)
        await sem.acquire("a")
        with pytest.raises(CoordinationError, match="holds 1 of its 1 and asks for 1 more.*raise the limit"):
            await sem.acquire("a")
        sem.release("a")

    async def test_reset_period_reclaims(self, clock: FakeClock) -> None:
        q = Quota("gpu_mem", 16.0, ttl=3600.0, clock=clock)
        await q.acquire("a", 16.0)
        async with clock.autojump():
            await q.acquire("b", 4.0)
        assert clock.monotonic() == pytest.approx(3600.0)
        assert q.status()["in_use"] == 4.0 and q.statistics().state == "in_use"
        q.release("b")

    async def test_partial_release(self, clock: FakeClock) -> None:
        q = Quota("pool", 100.0, clock=clock)
        await q.acquire("a", 10.0)
        await q.acquire("a", 10.0)
        q.release("a", 10.0)
        assert q.available == pytest.approx(90.0) and q.owners() == ["a"]
        q.release("a")
        assert q.available == pytest.approx(100.0)

    @pytest.mark.parametrize("amount", [-1, 0, float("nan"), "1", True])
    async def test_a_release_of_no_amount_is_refused(self, clock: FakeClock, amount: object) -> None:
        # A negative amount took more than the limit allows, NaN emptied the count while
        # the holder still held: then a newcomer was granted past the limit.
        q = Quota("pool", 4.0, clock=clock)
        await q.acquire("a", 2.0)
        await q.acquire("b", 1.0)
        with pytest.raises(CoordinationError, match="release a number > 0, or None"):
            q.release("a", amount)  # type: ignore[arg-type]
        assert q.available == pytest.approx(1.0) and q.try_acquire("c", 4.0) is False
        assert q.release("a") and q.release("b") and q.available == pytest.approx(4.0)


class TestBarrier:
    """max_count arrivals release together; fewer time out, saying how many arrived."""

    async def test_five_release_together(self, clock: FakeClock) -> None:
        barrier = Barrier("merge_results", 5, wait_timeout=30.0, clock=clock)
        released: list[tuple[str, float]] = []

        async def party(i: int) -> None:
            await clock.sleep(i * 2.0)  # arrive at 0, 2, 4, 6, 8
            await barrier.wait(f"chunk_{i}")
            released.append((f"chunk_{i}", clock.monotonic()))

        async with clock.autojump():
            await asyncio.gather(*(party(i) for i in range(5)))
        assert sorted(released) == [(f"chunk_{i}", 8.0) for i in range(5)]
        assert barrier.status()["rounds"] == 1

    async def test_four_of_five_time_out(self, clock: FakeClock) -> None:
        barrier = Barrier("merge_results", 5, wait_timeout=30.0, clock=clock)
        async with clock.autojump():
            results = await asyncio.gather(*(barrier.wait(f"c{i}") for i in range(4)), return_exceptions=True)
        assert all(isinstance(r, CoordinationTimeoutError) for r in results)
        assert "4 of 5" in str(results[0])
        assert clock.monotonic() == pytest.approx(30.0)
        assert barrier.arrived() == 0 and barrier.status()["broken"] == 1

    async def test_reusable_rounds(self, clock: FakeClock) -> None:
        barrier = Barrier("sync", 2, clock=clock)
        for _ in range(3):
            await asyncio.gather(barrier.wait("a"), barrier.wait("b"))
        assert barrier.status()["rounds"] == 3

    async def test_cancelled_party_leaves_the_round(self, clock: FakeClock) -> None:
        barrier = Barrier("sync", 2, clock=clock)
        a = asyncio.create_task(barrier.wait("a"))
        await settle()
        a.cancel()
        await settle()
        assert barrier.arrived() == 0


    async def test_each_index_once_after_a_party_left(self, clock: FakeClock) -> None:
        """The index elects a party (``if index == 0``): one that left leaves no gap."""
        barrier = Barrier("sync", 3, clock=clock)
        a = asyncio.create_task(barrier.wait("a"))
        b = asyncio.create_task(barrier.wait("b"))
        await settle()
        a.cancel()
        await settle()
        c = asyncio.create_task(barrier.wait("c"))
        d = asyncio.create_task(barrier.wait("d"))
        assert await asyncio.gather(b, c, d) == [0, 1, 2]

    async def test_a_round_that_opens_as_a_party_times_out_is_not_broken(
        self, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The last party arrives from another thread's loop just as the first one's time
        runs out: the round opened, so the first party passes, and the next round (which
        the old code broke with the first party's timeout) fills normally."""
        import threading

        from agent.coordination.primitives import barrier as barrier_module

        barrier = Barrier("sync", 2, clock=clock)
        elsewhere: list[int] = []

        async def time_runs_out_as_the_round_opens(clock, fut, timeout):
            thread = threading.Thread(target=lambda: elsewhere.append(asyncio.run(barrier.wait("b"))))
            thread.start()
            thread.join()  # the round opened there; its news to this loop is still queued
            return False

        monkeypatch.setattr(barrier_module, "wait_until_done", time_runs_out_as_the_round_opens)
        assert await barrier.wait("a", timeout=1.0) == 0
        assert elsewhere == [1]
        monkeypatch.undo()
        assert await asyncio.gather(barrier.wait("c"), barrier.wait("d")) == [0, 1]
        assert barrier.status()["broken"] == 0 and barrier.status()["rounds"] == 2

class TestBarrierGate:
    """Hand-overs arrive without waiting; the guarded owner passes once a group's round is full."""

    async def test_groups_do_not_mix(self, clock: FakeClock) -> None:
        barrier = Barrier("merge_results", 3, wait_timeout=30.0, clock=clock)
        gate = asyncio.create_task(barrier.pass_when_full("merge#run1", "run1"))
        for i in range(2):
            barrier.arrive(f"chunk{i}", "run1")
        for i in range(3):
            barrier.arrive(f"chunk{i}", "run2")  # another run's arrivals do not count for run1
        await settle()
        assert not gate.done() and barrier.arrived("run1") == 2
        barrier.arrive("chunk2", "run1")
        await gate
        await barrier.pass_when_full("merge#run2", "run2")  # run2's round was already full
        assert barrier.status()["rounds"] == 2

    async def test_times_out_saying_how_many(self, clock: FakeClock) -> None:
        barrier = Barrier("merge_results", 5, wait_timeout=30.0, clock=clock)
        for i in range(4):
            barrier.arrive(f"chunk{i}", "run1")
        async with clock.autojump():
            with pytest.raises(CoordinationTimeoutError, match="only 4 of 5 arrived within 30s"):
                await barrier.pass_when_full("merge", "run1")
        barrier.arrive("chunk4", "run1")  # a late fifth still fills the round for a retry
        await barrier.pass_when_full("merge", "run1", timeout=0)

    async def test_forget_fails_waiters(self, clock: FakeClock) -> None:
        barrier = Barrier("merge_results", 2, clock=clock)
        gate = asyncio.create_task(barrier.pass_when_full("merge", "run1"))
        await settle()
        barrier.forget("run1")
        with pytest.raises(CoordinationError, match="ended"):
            await gate
        assert barrier.status()["arrived"] == {}


class TestCreatePrimitive:
    """The factory checks each type gets what it needs."""

    @pytest.mark.parametrize(
        ("kind", "kwargs", "message"),
        [
            (PrimitiveType.SEMAPHORE, {}, "needs max_count"),
            (PrimitiveType.BARRIER, {}, "needs max_count"),
            (PrimitiveType.QUOTA, {}, "needs quota_limit"),
            (PrimitiveType.LEASE, {}, "needs a ttl"),
            ("spinlock", {}, "unknown primitive type"),
            (PrimitiveType.MUTEX, {"ttl": -1}, "ttl must be"),
        ],
    )
    def test_bad_settings(self, kind, kwargs, message) -> None:
        with pytest.raises(CoordinationError, match=message):
            create_primitive("x", kind, **kwargs)

    def test_by_name(self) -> None:
        assert isinstance(create_primitive("x", "mutex"), Mutex)
