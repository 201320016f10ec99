from __future__ import annotations

import asyncio
import logging

import pytest

from agent import events as ev
from agent.errors import MonitorConfigurationError
from agent.monitor import MetricType, agent_monitor
from agent.monitor.testing import FakeClock, FakeProcess, ManualTimer

from .conftest import Feed


def ambient_feed(clock: FakeClock, run: str = "r1") -> Feed:
    """Emit to whatever observers are attached around the caller, like Agent.run does."""

    def fan_out(event: ev.RunEvent) -> None:
        for observer in ev.ambient_observers():
            observer(event)

    return Feed(clock, fan_out, run=run)


def monitor(clock: FakeClock, **kwargs):
    return agent_monitor(clock=clock, process=FakeProcess(), **kwargs)


class TestFinalMetrics:
    """Without realtime the callback gets the metrics once, at the end."""

    async def test_return_value_and_final_callback(self, clock):
        received = []

        @monitor(clock, metrics_callback=received.append)
        async def workflow(n: int) -> str:
            feed = ambient_feed(clock)
            feed.emit(ev.RUN_STARTED)
            for i in range(n):
                feed.state(f"s{i}", 0.5)
            feed.emit(ev.RUN_FINISHED, status="completed")
            return "done"

        assert workflow.last_metrics is None
        assert await workflow(3) == "done"
        assert len(received) == 1
        data = received[0]
        assert data["timing"]["total_execution"]["count"] == 3
        assert data["throughput"]["states_per_second"]["avg"] == pytest.approx(2.0)
        assert workflow.last_metrics == data
        assert workflow.__name__ == "workflow"

    async def test_bare_decorator(self, clock):
        @agent_monitor
        async def workflow():
            ambient_feed(clock).emit(ev.RUN_STARTED)
            return 7

        assert await workflow() == 7
        assert set(workflow.last_metrics) == {t.category for t in MetricType if t.value and t is not MetricType.ALL}

    async def test_selected_categories(self, clock):
        @monitor(clock, metrics=MetricType.TIMING | MetricType.ERRORS)
        async def workflow():
            return None

        await workflow()
        assert set(workflow.last_metrics) == {"timing", "errors"}

    async def test_exception_still_reports_and_propagates(self, clock):
        received = []

        @monitor(clock, metrics_callback=received.append)
        async def workflow():
            feed = ambient_feed(clock)
            feed.emit(ev.RUN_STARTED)
            feed.failure("bad", 0.1, attempt=1, final=True)
            feed.emit(ev.RUN_FINISHED, status="failed")
            raise RuntimeError("workflow failed")

        with pytest.raises(RuntimeError, match="workflow failed"):
            await workflow()
        assert received[0]["errors"]["count"]["sum"] == 1

    async def test_failing_callback_is_logged_not_raised(self, clock, caplog):
        def broken(metrics):
            raise ValueError("callback bug")

        @monitor(clock, metrics_callback=broken)
        async def workflow():
            return 1

        with caplog.at_level(logging.ERROR, logger="agent.monitor"):
            assert await workflow() == 1
        assert "callback bug" in caplog.text

    async def test_runs_outside_are_not_seen(self, clock):
        @monitor(clock)
        async def workflow():
            return None

        outside = ambient_feed(clock, run="outside")
        outside.emit(ev.RUN_STARTED)  # nobody attached: goes nowhere
        await workflow()
        assert workflow.last_metrics["concurrency"]["active_runs"]["count"] == 0
        assert ev.ambient_observers() == ()

    async def test_nested_monitors_both_see_runs(self, clock):
        @monitor(clock)
        async def inner():
            feed = ambient_feed(clock)
            feed.emit(ev.RUN_STARTED)
            feed.state("x", 1.0)
            feed.emit(ev.RUN_FINISHED, status="completed")

        @monitor(clock)
        async def outer():
            await inner()

        await outer()
        assert inner.last_metrics["state"]["completed"]["sum"] == 1
        assert outer.last_metrics["state"]["completed"]["sum"] == 1


class TestRealtime:
    """With realtime the callback gets an update per interval, then the final one."""

    async def test_updates_then_final(self, clock):
        timer = ManualTimer(clock)
        updates: list[dict] = []
        got = asyncio.Event()
        proceed = asyncio.Event()

        async def callback(metrics):
            updates.append(metrics)
            got.set()

        @monitor(clock, realtime=True, update_interval=1.0, metrics_callback=callback, sleep=timer.sleep)
        async def workflow():
            feed = ambient_feed(clock)
            feed.emit(ev.RUN_STARTED)
            feed.state("first", 0.5)
            await proceed.wait()
            feed.state("second", 0.5)
            feed.emit(ev.RUN_FINISHED, status="completed")
            return "ok"

        task = asyncio.create_task(workflow())
        await timer.wait_sleeping()
        timer.fire()
        await got.wait()
        assert updates[0]["state"]["completed"]["sum"] == 1
        proceed.set()
        assert await task == "ok"
        assert len(updates) == 2
        assert updates[-1]["state"]["completed"]["sum"] == 2
        assert updates[-1]["throughput"]["states_per_second"]["count"] == 2
        assert timer.sleepers == 0

    async def test_not_aggregated_gives_deltas(self, clock):
        timer = ManualTimer(clock)
        updates: list[dict] = []
        got = asyncio.Event()
        proceed = asyncio.Event()

        def callback(metrics):
            updates.append(metrics)
            got.set()

        @monitor(clock, realtime=True, metrics_callback=callback, sleep=timer.sleep, aggregate=False)
        async def workflow():
            feed = ambient_feed(clock)
            feed.emit(ev.RUN_STARTED)
            feed.state("a", 0.5)
            feed.state("b", 0.5)
            await proceed.wait()
            feed.state("c", 0.5)
            feed.emit(ev.RUN_FINISHED, status="completed")

        task = asyncio.create_task(workflow())
        await timer.wait_sleeping()
        timer.fire()
        await got.wait()
        proceed.set()
        await task
        assert [u["state"]["completed"]["sum"] for u in updates] == [2, 1]

    async def test_cancelled_workflow_still_reports(self, clock):
        timer = ManualTimer(clock)
        updates: list[dict] = []
        started = asyncio.Event()

        @monitor(clock, realtime=True, metrics_callback=updates.append, sleep=timer.sleep)
        async def workflow():
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(workflow())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(updates) == 1
        assert timer.sleepers == 0


class TestConfiguration:
    """Bad arguments raise MonitorConfigurationError saying what to pass."""

    def test_sync_function(self):
        with pytest.raises(MonitorConfigurationError, match="async def"):
            agent_monitor()(lambda: None)

    @pytest.mark.parametrize("interval", [0, -1, float("inf"), float("nan"), "1", True])
    def test_bad_interval(self, interval):
        with pytest.raises(MonitorConfigurationError, match="update_interval"):
            agent_monitor(update_interval=interval)

    def test_bad_callback(self):
        with pytest.raises(MonitorConfigurationError, match="metrics_callback"):
            agent_monitor(metrics_callback="print")

    @pytest.mark.parametrize("kwargs", [{"aggregate": "no"}, {"realtime": "yes"}, {"realtime": 1}])
    def test_flags_are_booleans(self, kwargs):
        with pytest.raises(MonitorConfigurationError, match=f"{next(iter(kwargs))}=...\\) must be True or False"):
            agent_monitor(**kwargs)

    def test_bad_metrics(self):
        with pytest.raises(MonitorConfigurationError, match="MetricType"):
            agent_monitor(metrics="ALL")

    @pytest.mark.parametrize("kwargs,message", [
        ({"clock": 5}, r"agent_monitor\(clock=...\) must be a function returning seconds, like time.monotonic, "
                       r"got int 5"),
        ({"clock": None}, r"agent_monitor\(clock=...\) must be a function .* got NoneType None"),
        ({"sleep": 5}, r"agent_monitor\(sleep=...\) must be an async function taking seconds, like asyncio.sleep, "
                       r"got int 5"),
        ({"sleep": None}, r"agent_monitor\(sleep=...\) .* got NoneType None"),
        ({"process": 5}, r"agent_monitor\(process=...\) must be a ProcessSampler with cpu_seconds\(\) and "
                         r"rss_bytes\(\) \(or None\), got int 5 \(it has no cpu_seconds\(\), rss_bytes\(\)\)"),
        ({"process": FakeClock()}, r"agent_monitor\(process=...\) .* \(it has no cpu_seconds\(\), rss_bytes\(\)\)"),
    ])
    def test_bad_injectables(self, kwargs, message):
        """Refused at decoration, not once the decorated coroutine runs."""
        with pytest.raises(MonitorConfigurationError, match=message):
            agent_monitor(realtime=True, **kwargs)

    def test_good_injectables(self):
        clock = FakeClock()
        decorate = agent_monitor(realtime=True, clock=clock, sleep=ManualTimer(clock).sleep, process=FakeProcess())
        assert callable(decorate)
        assert callable(agent_monitor(process=None))
