"""The fake clock: time moves only when told, sleepers wake in deadline order."""

from __future__ import annotations

import asyncio

import pytest

from agent.clock import Clock, FakeClock, SystemClock, settle, wait_until_done


class TestFakeClock:
    """Sleepers wake when the clock passes their deadline, never before."""

    async def test_advance_wakes_in_deadline_order(self, clock: FakeClock) -> None:
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, delay: float) -> None:
            await clock.sleep(delay)
            woke.append((name, clock.monotonic()))

        tasks = [asyncio.create_task(sleeper(n, d)) for n, d in (("c", 3.0), ("a", 1.0), ("b", 2.0))]
        await clock.advance(1.5)
        assert woke == [("a", 1.0)]
        await clock.advance(10)
        assert woke == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
        assert clock.monotonic() == 11.5
        await asyncio.gather(*tasks)

    async def test_autojump_runs_a_simulated_hour_at_once(self, clock: FakeClock) -> None:
        async with clock.autojump():
            for _ in range(60):
                await clock.sleep(60.0)
        assert clock.monotonic() == pytest.approx(3600.0)

    async def test_cancelled_sleeper_is_forgotten(self, clock: FakeClock) -> None:
        task = asyncio.create_task(clock.sleep(5))
        await settle()
        assert clock.pending() == 1
        task.cancel()
        await settle()
        assert clock.pending() == 0 and clock.next_deadline() is None

    async def test_negative_advance_is_refused(self, clock: FakeClock) -> None:
        with pytest.raises(ValueError, match="backwards"):
            await clock.advance(-1)

    def test_both_clocks_satisfy_the_protocol(self) -> None:
        assert isinstance(FakeClock(), Clock) and isinstance(SystemClock(), Clock)


class TestWaitUntilDone:
    """A future wait bounded by clock time, that never cancels the future itself."""

    async def test_times_out_on_clock_time(self, clock: FakeClock) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        async with clock.autojump():
            assert await wait_until_done(clock, fut, 2.0) is False
        assert clock.monotonic() == 2.0 and not fut.done()
        fut.cancel()

    async def test_returns_when_the_future_completes(self, clock: FakeClock) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, None)
        assert await wait_until_done(clock, fut, 100.0) is True
        assert clock.monotonic() == 0.0
