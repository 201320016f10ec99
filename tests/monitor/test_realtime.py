from __future__ import annotations

import asyncio

import pytest

from agent import events as ev
from agent.errors import MonitorConfigurationError, MonitorError
from agent.monitor import MetricType, RealTimeMetrics
from agent.monitor.testing import FakeProcess, ManualTimer

from .test_decorator import ambient_feed


@pytest.fixture
def timer(clock):
    return ManualTimer(clock)


@pytest.fixture
def rt(clock, timer):
    return RealTimeMetrics(update_interval=1.0, clock=clock, sleep=timer.sleep, process=FakeProcess())


class Recorder:
    def __init__(self):
        self.updates: list[dict] = []
        self.changed = asyncio.Condition()

    async def __call__(self, metrics):
        self.updates.append(metrics)
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, count):
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.updates) >= count)


class TestLifecycle:
    """start() attaches to ambient runs and ticks; stop() detaches and sends a last update."""

    async def test_start_stop_without_await(self, rt, timer, clock):
        rec = Recorder()
        rt.subscribe(rec)
        rt.start()  # called plainly, as the dashboard example does
        assert rt.running
        feed = ambient_feed(clock)
        feed.emit(ev.RUN_STARTED)
        feed.state("a", 0.5)
        await timer.wait_sleeping()
        timer.fire()
        await rec.wait_for(1)
        assert rec.updates[0]["state"]["completed"]["sum"] == 1
        feed.state("b", 0.5)
        stopped = rt.stop()
        assert ev.ambient_observers() == ()
        await stopped
        assert len(rec.updates) == 2
        assert rec.updates[-1]["state"]["completed"]["sum"] == 2
        assert not rt.running and timer.sleepers == 0

    async def test_awaited_forms(self, rt, clock):
        rec = Recorder()
        rt.subscribe(rec)
        await rt.start()
        ambient_feed(clock).emit(ev.RUN_STARTED)
        clock.advance(1.0)
        await rt.stop()
        assert len(rec.updates) == 1
        assert rec.updates[0]["concurrency"]["active_runs"]["max"] == 1

    async def test_events_after_stop_are_ignored(self, rt, clock):
        rt.start()
        feed = ambient_feed(clock)
        observers = ev.ambient_observers()
        await rt.stop()
        for observer in observers:  # e.g. a run that captured the observer earlier
            observer(ev.RunEvent(ev.RUN_STARTED, "wf", "late", time=clock.now))
        assert rt.collector.active_runs == 0
        feed.emit(ev.RUN_STARTED)
        assert rt.collector.active_runs == 0

    async def test_stop_from_another_task(self, rt):
        rt.start()
        await asyncio.create_task(_stop(rt))
        assert not rt.running

    async def test_stop_when_never_started(self, rt):
        await rt.stop()

    async def test_start_twice_is_one_ticker(self, rt, timer):
        rt.start()
        rt.start()
        await timer.wait_sleeping()
        assert timer.sleepers == 1
        await rt.stop()

    def test_start_without_loop(self, rt):
        with pytest.raises(MonitorError, match="running event loop"):
            rt.start()
        assert ev.ambient_observers() == ()

    def test_stop_without_loop(self, rt):
        with pytest.raises(MonitorError, match="stop them from async code"):
            rt.stop()


async def _stop(rt):
    await rt.stop()


class TestFinalWindow:
    """The update stop() sends counts what happened since the last tick, however short."""

    async def test_a_short_last_window_is_in_the_final_update(self, rt, timer, clock):
        rec = Recorder()
        rt.subscribe(rec)
        rt.start()
        feed = ambient_feed(clock)
        feed.emit(ev.RUN_STARTED)
        feed.emit(ev.STATE_STARTED, "s", attempt=1)
        for count in (1, 2, 3):  # three windows of 1 s while the state runs
            await timer.wait_sleeping()
            timer.fire()
            await rec.wait_for(count)
        clock.advance(0.02)  # it completes 20 ms into the fourth window
        feed.emit(ev.STATE_COMPLETED, "s", attempt=1, duration=3.02)
        feed.emit(ev.RUN_FINISHED, status="completed")
        await timer.wait_sleeping()
        timer.fire()  # a tick with 20 ms of run time: too short for a rate, carried over
        await rec.wait_for(4)
        assert rec.updates[3]["throughput"]["states_per_second"]["current"] == 0.0
        await rt.stop()
        assert len(rec.updates) == 5
        final = rec.updates[-1]
        assert final["state"]["completed"]["sum"] == 1
        sps = final["throughput"]["states_per_second"]
        # The tail is measured with the window before it: one state in their 1.02 s, not 50/s in 20 ms,
        # added as a value of its own (the windows before keep theirs).
        assert sps["current"] == pytest.approx(1 / 1.02)
        assert sps["count"] == 4 and sps["sum"] == pytest.approx(1 / 1.02)
        assert final["throughput"]["attempts_per_second"]["sum"] == pytest.approx(1.0)


class TestSubscribers:
    """Subscribers may be sync or async; unsubscribed ones get nothing."""

    async def test_subscribe_unsubscribe(self, rt, clock):
        sync_updates, rec = [], Recorder()
        rt.subscribe(sync_updates.append)
        rt.subscribe(rec)
        rt.subscribe(rec)  # once only
        assert len(rt.subscribers) == 2
        ambient_feed(clock)  # nothing attached yet
        rt.start()
        ambient_feed(clock).emit(ev.RUN_STARTED)
        clock.advance(1.0)
        await rt.publish()
        rt.unsubscribe(rec)
        rt.unsubscribe(rec)  # no-op
        await rt.stop()
        assert len(sync_updates) == 2 and len(rec.updates) == 1

    async def test_selected_types(self, clock, timer):
        rt = RealTimeMetrics(metrics=MetricType.ERRORS, clock=clock, sleep=timer.sleep, process=FakeProcess())
        assert set(rt.metrics()) == {"errors"}

    def test_bad_subscriber(self, rt):
        with pytest.raises(MonitorConfigurationError):
            rt.subscribe(None)
        with pytest.raises(MonitorConfigurationError):
            rt.subscribe(42)

    def test_bad_interval(self):
        with pytest.raises(MonitorConfigurationError):
            RealTimeMetrics(update_interval=0)

    async def test_add_observer_path(self, rt, clock):
        """Runs started elsewhere can be fed through rt.observer."""
        rt.start()
        try:
            task_feed = asyncio.create_task(_emit_without_ambient(rt, clock))
            await task_feed
        finally:
            await rt.stop()
        assert rt.collector.live().recent[0].run_id == "elsewhere"


async def _emit_without_ambient(rt, clock):
    rt.observer(ev.RunEvent(ev.RUN_STARTED, "wf", "elsewhere", time=clock.now))
    clock.advance(1)
    rt.observer(ev.RunEvent(ev.RUN_FINISHED, "wf", "elsewhere", status="completed", time=clock.now))


class TestSeams:
    """clock, sleep and process are checked when given, as agent_monitor's are."""

    @pytest.mark.parametrize("kwargs,words", [
        ({"clock": 5}, "RealTimeMetrics(clock=...) must be a function returning seconds"),
        ({"sleep": None}, "RealTimeMetrics(sleep=...) must be an async function taking seconds"),
        ({"process": 5}, "RealTimeMetrics(process=...) must be a ProcessSampler"),
    ])
    def test_refused_when_made(self, kwargs, words):
        with pytest.raises(MonitorConfigurationError) as raised:
            RealTimeMetrics(**kwargs)
        assert words in str(raised.value)
