"""Rate limiters under a fake clock: exact admissions, never over the limit."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.clock import FakeClock, settle
from agent.coordination.ratelimit import (
    FixedWindow,
    LeakyBucket,
    RateLimitStrategy,
    SlidingWindow,
    TokenBucket,
    create_rate_limiter,
)
from agent.errors import CoordinationError, CoordinationTimeoutError


async def _admissions(limiter, clock: FakeClock, callers: int, until: float) -> list[float]:
    """Times at which ``callers`` greedy callers were admitted before ``until``."""
    times: list[float] = []

    async def caller() -> None:
        while True:
            await limiter.acquire()
            if clock.monotonic() >= until - 1e-9:
                return
            times.append(clock.monotonic())

    async with clock.autojump():
        await asyncio.gather(*(caller() for _ in range(callers)))
    return sorted(times)


def _per_second(times: list[float]) -> list[int]:
    counts = Counter(math.floor(t + 1e-9) for t in times)
    return [counts[s] for s in range(max(counts) + 1)]


class TestTokenBucket:
    """10/s with a burst of 5: five at once, then one every 0.1 s."""

    async def test_starts_per_simulated_second(self, clock: FakeClock) -> None:
        bucket = TokenBucket("api_call", 10.0, burst_size=5, clock=clock)
        times = await _admissions(bucket, clock, callers=20, until=5.0)
        assert times[:5] == [0.0] * 5
        assert _per_second(times) == [14, 10, 10, 10, 10]  # burst 5 + 0.1..0.9, then 10 a second
        gaps = [b - a for a, b in zip(times[4:], times[5:])]
        assert all(g == pytest.approx(0.1) for g in gaps)

    async def test_refills_after_idle(self, clock: FakeClock) -> None:
        bucket = TokenBucket("api_call", 10.0, burst_size=5, clock=clock)
        assert [bucket.try_acquire() for _ in range(6)] == [True] * 5 + [False]
        await clock.advance(0.3)
        assert [bucket.try_acquire() for _ in range(4)] == [True] * 3 + [False]
        await clock.advance(100)
        assert bucket.tokens() == pytest.approx(5.0)  # never above the burst size

    async def test_try_acquire_never_overtakes_a_waiter(self, clock: FakeClock) -> None:
        bucket = TokenBucket("api_call", 1.0, burst_size=1, clock=clock)
        assert bucket.try_acquire()
        waiter = asyncio.create_task(bucket.acquire())
        await settle()
        await clock.advance(1.0)
        assert waiter.done()
        await clock.advance(1.0)
        blocked = asyncio.create_task(bucket.acquire())
        await settle()
        assert blocked.done()  # a token was there, no queue: admitted at once
        assert bucket.try_acquire() is False

    async def test_timeout(self, clock: FakeClock) -> None:
        bucket = TokenBucket("api_call", 1.0, burst_size=1, clock=clock)
        await bucket.acquire()
        with pytest.raises(CoordinationTimeoutError, match="within 0.5s"):
            await bucket.acquire(timeout=0.5)
        assert bucket.statistics().timeouts == 1

    async def test_a_timeout_counts_while_others_are_ahead_in_line(self, clock: FakeClock) -> None:
        # It was checked only once the caller reached the head: 2.5 s for a 0.3 s timeout.
        bucket = LeakyBucket("api_call", 2.0, clock=clock)
        await bucket.acquire()
        ahead = [asyncio.create_task(bucket.acquire()) for _ in range(5)]
        await settle()
        async with clock.autojump():
            with pytest.raises(CoordinationTimeoutError, match="within 0.3s"):
                await bucket.acquire(timeout=0.3)
            assert clock.monotonic() == pytest.approx(0.3)
            await asyncio.gather(*ahead)
        assert bucket.statistics().waiting == 0 and bucket.statistics().timeouts == 1


class TestReset:
    """reset() forgets past starts and fails whoever waits (the docs' reset_coordination)."""

    async def test_waiters_fail_and_the_next_start_is_at_once(self, clock: FakeClock) -> None:
        limiter = SlidingWindow("api", 1 / 60, window_size=60.0, clock=clock)  # one start a minute
        await limiter.acquire()
        head = asyncio.create_task(limiter.acquire())  # asleep until the window moves on
        behind = asyncio.create_task(limiter.acquire())
        await settle()
        limiter.reset()
        for waiter in (head, behind):
            with pytest.raises(CoordinationError, match="rate limit 'api' was reset while a start waited"):
                await waiter
        assert limiter.statistics().waiting == 0
        await limiter.acquire(timeout=0)  # afresh: no wait
        assert clock.monotonic() == 0.0


class TestLeakyBucket:
    """Starts evenly spaced at 1 / max_rate, no burst."""

    async def test_even_spacing(self, clock: FakeClock) -> None:
        bucket = LeakyBucket("data_ingestion", 50.0, clock=clock)
        times = await _admissions(bucket, clock, callers=7, until=2.0)
        assert len(times) == 100
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g == pytest.approx(0.02) for g in gaps)

    async def test_no_burst_after_idle(self, clock: FakeClock) -> None:
        bucket = LeakyBucket("data_ingestion", 2.0, clock=clock)
        await clock.advance(100)
        assert bucket.try_acquire() and not bucket.try_acquire()
        await clock.advance(0.5)
        assert bucket.try_acquire()


class TestSlidingWindow:
    """max_rate is per second: max_rate=100 over 60 s admits 6000 per window."""

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        rate=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
        window=st.sampled_from([0.5, 1.0, 2.5, 10.0]),
        arrivals=st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), min_size=1, max_size=60),
    )
    def test_never_exceeds_the_limit(self, rate: float, window: float, arrivals: list[float]) -> None:
        """In every window of window_size seconds, at most max_rate * window_size starts."""
        assume(rate * window >= 1)  # shorter windows are refused (TestFactory)

        async def scenario() -> tuple[list[float], int]:
            clock = FakeClock()
            limiter = SlidingWindow("api_call", rate, window, clock=clock)
            admitted: list[float] = []

            async def arrive(at: float) -> None:
                await clock.sleep(at)
                await limiter.acquire()
                admitted.append(clock.monotonic())

            async with clock.autojump():
                await asyncio.gather(*(arrive(a) for a in arrivals))
            return sorted(admitted), limiter.limit

        admitted, limit = asyncio.run(scenario())
        assert len(admitted) == len(arrivals)
        assert limit == math.floor(rate * window + 1e-9) <= rate * window + 1e-9
        for i in range(len(admitted) - limit):
            # the start limit places later must lie a full window after this one
            assert admitted[i + limit] - admitted[i] >= window - 1e-6

    async def test_spec_example_limit(self, clock: FakeClock) -> None:
        limiter = SlidingWindow("api_call", 100.0, 60.0, clock=clock)
        assert limiter.limit == 6000
        assert sum(limiter.try_acquire() for _ in range(6001)) == 6000
        await clock.advance(59.9)
        assert not limiter.try_acquire()
        await clock.advance(0.1)
        assert limiter.try_acquire()
        assert limiter.status()["in_window"] == 1


class TestFixedWindow:
    """At most the limit per aligned window, reset at each boundary."""

    async def test_per_window(self, clock: FakeClock) -> None:
        limiter = FixedWindow("api_call", 5.0, 1.0, clock=clock)
        times = await _admissions(limiter, clock, callers=9, until=4.0)
        assert _per_second(times) == [5, 5, 5, 5]
        assert all(t == math.floor(t + 1e-9) for t in times)  # each window's starts at its opening

    async def test_a_rate_below_one_per_window_needs_a_longer_window(self, clock: FakeClock) -> None:
        with pytest.raises(CoordinationError, match="less than one: use window_size >= 2s"):
            FixedWindow("api_call", 0.5, 1.0, clock=clock)  # rounding up to 1 a second would double the rate
        limiter = FixedWindow("api_call", 0.5, 2.0, clock=clock)
        times = await _admissions(limiter, clock, callers=3, until=10.0)
        assert times == [0.0, 2.0, 4.0, 6.0, 8.0]  # 0.5 a second


class TestFactory:
    """Strategies by enum or name; bad settings are typed errors."""

    def test_builds_each(self) -> None:
        kinds = {s: type(create_rate_limiter("x", 10.0, s)) for s in RateLimitStrategy}
        assert kinds == {
            RateLimitStrategy.TOKEN_BUCKET: TokenBucket,
            RateLimitStrategy.LEAKY_BUCKET: LeakyBucket,
            RateLimitStrategy.SLIDING_WINDOW: SlidingWindow,
            RateLimitStrategy.FIXED_WINDOW: FixedWindow,
        }
        assert isinstance(create_rate_limiter("x", 1.0, "sliding_window"), SlidingWindow)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"max_rate": 0}, "max_rate"),
            ({"max_rate": -1.0}, "max_rate"),
            ({"max_rate": 1.0, "strategy": "bogus"}, "unknown rate limit strategy"),
            ({"max_rate": 1.0, "burst_size": 0}, "burst_size"),
            ({"max_rate": 1.0, "strategy": RateLimitStrategy.SLIDING_WINDOW, "window_size": 0}, "window_size"),
            # burst_size belongs to TOKEN_BUCKET; the other strategies would ignore it
            ({"max_rate": 5.0, "strategy": RateLimitStrategy.SLIDING_WINDOW, "burst_size": 3}, "TOKEN_BUCKET only"),
            ({"max_rate": 5.0, "strategy": RateLimitStrategy.FIXED_WINDOW, "burst_size": 3}, "TOKEN_BUCKET only"),
            ({"max_rate": 5.0, "strategy": RateLimitStrategy.LEAKY_BUCKET, "burst_size": 3}, "TOKEN_BUCKET only"),
            # a window must hold at least one start at max_rate (rounding up would exceed it)
            ({"max_rate": 0.5, "strategy": RateLimitStrategy.SLIDING_WINDOW}, r"use window_size >= 2s"),
            ({"max_rate": 0.5, "strategy": RateLimitStrategy.FIXED_WINDOW}, r"use window_size >= 2s"),
            ({"max_rate": 3.0, "strategy": RateLimitStrategy.SLIDING_WINDOW, "window_size": 0.25}, "less than one"),
        ],
    )
    def test_bad_settings(self, kwargs, message) -> None:
        with pytest.raises(CoordinationError, match=message):
            create_rate_limiter("x", **kwargs)


class TestSharedByThreads:
    """One limiter serves the runs of every thread's event loop (run_sync in threads)."""

    def test_waiters_on_several_loops_are_all_admitted_in_turn(self) -> None:
        import threading

        limiter = LeakyBucket("api", max_rate=50.0)
        admitted: list[tuple[int, float]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def thread(number: int) -> None:
            async def run() -> None:
                for _ in range(5):
                    await limiter.acquire()
                    with lock:
                        admitted.append((number, limiter.clock.monotonic()))

            try:
                asyncio.run(run())
            except BaseException as exc:  # an asyncio.Lock bound to another loop raised here
                errors.append(exc)

        threads = [threading.Thread(target=thread, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and len(admitted) == 20
        assert limiter.statistics().admitted == 20 and limiter.statistics().waiting == 0

    @pytest.mark.parametrize("at_head", [True, False])
    # The abandoned coroutine, closed with no loop to run its cleanup on, says so: the scenario.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    def test_a_waiter_whose_loop_closed_holds_nobody_up(self, at_head: bool) -> None:
        """A loop closed without cancelling its tasks (run_until_complete, then close) left its
        waiter in line: at the head nobody behind it was woken; behind, it was counted out
        twice (waiting -1, and other settings refused for good as "in use")."""
        import threading

        limiter = LeakyBucket("api", max_rate=20.0)
        limiter.try_acquire()

        def abandoned() -> None:
            loop = asyncio.new_event_loop()

            async def leave_one_waiting() -> None:
                loop.create_task(limiter.acquire())
                await asyncio.sleep(0.01)

            loop.run_until_complete(leave_one_waiting())
            loop.close()

        async def main() -> None:
            head = None if at_head else asyncio.create_task(limiter.acquire())
            await asyncio.sleep(0)
            thread = threading.Thread(target=abandoned)
            thread.start()
            thread.join()
            await asyncio.wait_for(limiter.acquire(), 10)
            if head is not None:
                await head

        asyncio.run(main())
        import gc

        gc.collect()  # the abandoned coroutine is closed: its cleanup runs
        assert limiter.statistics().waiting == 0
