from __future__ import annotations

import pytest

from agent import events as ev
from agent.errors import MonitorConfigurationError
from agent.monitor import CATALOGUE, MetricsCollector, MetricType
from agent.monitor.aggregation import STAT_NAMES

from .conftest import Feed


def run_chain(feed: Feed, states: int = 4, seconds: float = 0.25) -> None:
    feed.emit(ev.RUN_STARTED)
    for i in range(states):
        feed.state(f"s{i}", seconds)
    feed.emit(ev.RUN_FINISHED, status="completed")


class TestMetricsShape:
    """The metrics dict has exactly the selected categories, each fully populated."""

    def test_all_categories_and_names_present_before_any_event(self, collector):
        data = collector.metrics()
        assert set(data) == {spec.category for spec in CATALOGUE}
        for spec in CATALOGUE:
            assert set(data[spec.category][spec.name]) == set(STAT_NAMES)
        assert data["throughput"]["states_per_second"]["avg"] == 0.0
        assert data["resources"]["used_CPU"]["current"] == 0.0
        assert data["errors"]["count"]["sum"] == 0.0

    def test_selected_categories_only(self, collector):
        data = collector.metrics(MetricType.TIMING | MetricType.THROUGHPUT)
        assert set(data) == {"timing", "throughput"}

    def test_category_of_combined_flag_is_an_error(self):
        with pytest.raises(ValueError):
            _ = (MetricType.TIMING | MetricType.ERRORS).category

    def test_returns_a_copy(self, collector):
        data = collector.metrics()
        data["errors"]["count"]["sum"] = 99
        assert collector.metrics()["errors"]["count"]["sum"] == 0.0


class TestTimingAndThroughput:
    """Durations come from the events; rates are per second of active run time."""

    def test_chain(self, feed, collector):
        run_chain(feed, states=4, seconds=0.25)
        assert collector.sample(final=True)
        data = collector.metrics()
        execution = data["timing"]["total_execution"]
        assert execution["count"] == 4
        assert execution["avg"] == pytest.approx(250.0)
        assert execution["p95"] == pytest.approx(250.0)
        assert data["timing"]["run_duration"]["sum"] == pytest.approx(1000.0)
        # 4 states in 1.0 s of active time
        assert data["throughput"]["states_per_second"]["avg"] == pytest.approx(4.0)
        assert data["state"]["completed"]["sum"] == 4
        assert data["state"]["success_rate"]["avg"] == 1.0
        assert data["concurrency"]["running_states"]["max"] == 1

    def test_idle_time_between_runs_is_not_counted(self, feed, collector, clock):
        run_chain(feed, states=2, seconds=0.5)
        clock.advance(60.0)  # nothing runs
        feed.run = "r2"
        run_chain(feed, states=2, seconds=0.5)
        collector.sample(final=True)
        assert collector.metrics()["throughput"]["states_per_second"]["current"] == pytest.approx(2.0)

    def test_windows_add_one_value_each(self, feed, collector, clock):
        feed.emit(ev.RUN_STARTED)
        feed.state("a", 1.0)
        feed.state("b", 1.0)
        assert collector.sample()  # window 1: 2 states in 2 s
        feed.state("c", 0.5)
        feed.state("d", 0.5)
        feed.state("e", 0.5)
        feed.state("f", 0.5)  # window 2: 4 states in 2 s
        assert collector.sample()
        sps = collector.metrics()["throughput"]["states_per_second"]
        assert sps["count"] == 2 and sps["min"] == pytest.approx(1.0) and sps["max"] == pytest.approx(2.0)

    def test_short_window_is_carried_over(self, feed, collector, clock):
        feed.emit(ev.RUN_STARTED)
        feed.state("a", 0.01)
        assert not collector.sample()
        feed.state("b", 0.09)
        assert collector.sample()
        assert collector.metrics()["throughput"]["states_per_second"]["current"] == pytest.approx(20.0)

    def test_a_short_tail_does_not_pull_the_average_up(self, feed, collector, clock):
        feed.emit(ev.RUN_STARTED)
        for name in "abcd":
            feed.state(name, 0.5)
        assert collector.sample()  # 4 states in 2 s
        feed.state("e", 0.01)  # a tail of 10 ms with one state: 100 per second, on its own
        assert collector.sample(final=True)  # measured with the window before it: 5 states in 2.01 s
        sps = collector.metrics()["throughput"]["states_per_second"]
        assert sps["count"] == 2 and sps["min"] == pytest.approx(2.0)  # the window before keeps its value
        assert sps["current"] == sps["max"] == pytest.approx(5 / 2.01)
        assert sps["avg"] == pytest.approx((2.0 + 5 / 2.01) / 2)

    def test_a_short_tail_never_lowers_sum_or_count(self, feed, collector, clock, process):
        # What an exporter reads as a Prometheus summary's _sum and _count must only grow.
        feed.emit(ev.RUN_STARTED)
        for name in "abcd":
            feed.state(name, 0.5)
        process.cpu += 1.0
        process.rss = 256 * 1024 * 1024
        assert collector.sample()  # 4 states, 50 % CPU, 256 MiB in 2 s
        before = collector.metrics()
        clock.advance(0.01)  # a tail of 10 ms: nothing completes, less memory
        process.rss = 64 * 1024 * 1024
        feed.emit(ev.RUN_FINISHED, status="completed")
        assert collector.sample(final=True)
        after = collector.metrics()
        lowered = [(category, name) for category, figures in before.items() for name, stats in figures.items()
                   if after[category][name]["sum"] < stats["sum"] or after[category][name]["count"] < stats["count"]]
        assert lowered == []

    def test_a_short_run_still_reports_its_rate(self, feed, collector, clock):
        feed.emit(ev.RUN_STARTED)
        feed.state("a", 0.01)
        assert collector.sample(final=True)  # the only window
        assert collector.metrics()["throughput"]["states_per_second"]["avg"] == pytest.approx(100.0)

    def test_no_activity_adds_nothing(self, collector):
        assert not collector.sample(final=True)
        assert collector.metrics()["throughput"]["states_per_second"]["count"] == 0

    def test_fan_out_concurrency(self, feed, collector, clock):
        feed.emit(ev.RUN_STARTED)
        for name in ("a", "b", "c"):
            feed.emit(ev.STATE_STARTED, name, attempt=1)
        clock.advance(1.0)
        for name in ("a", "b", "c"):
            feed.emit(ev.STATE_COMPLETED, name, attempt=1, duration=1.0)
        data = collector.metrics()
        assert data["concurrency"]["running_states"]["max"] == 3
        assert data["latency"]["turnaround"]["avg"] == pytest.approx(1000.0)


class TestErrorsAndRetries:
    """Failed attempts, retries and final failures are counted exactly."""

    def test_flaky_state(self, feed, collector):
        feed.emit(ev.RUN_STARTED)
        feed.failure("flaky", 0.1, attempt=1, final=False)
        feed.emit(ev.STATE_RETRYING, "flaky", attempt=1, data={"delay": 0.5})
        feed.failure("flaky", 0.1, attempt=2, final=False)
        feed.emit(ev.STATE_RETRYING, "flaky", attempt=2, data={"delay": 1.0})
        feed.state("flaky", 0.1, attempt=3)
        feed.failure("doomed", 0.1, attempt=1, final=True)
        feed.emit(ev.RUN_FINISHED, status="failed")
        data = collector.metrics()
        assert data["errors"]["count"]["sum"] == 3
        assert data["errors"]["failed_states"]["sum"] == 1
        assert data["errors"]["error_rate"]["avg"] == pytest.approx(3 / 4)
        assert data["retries"]["count"]["sum"] == 2
        assert data["retries"]["delay"]["max"] == pytest.approx(1000.0)
        assert data["retries"]["attempts_per_state"]["max"] == 3
        assert data["state"]["success_rate"]["avg"] == pytest.approx(0.5)
        assert data["timing"]["total_execution"]["count"] == 1
        assert collector.live().recent[0].status == "failed"


class TestResources:
    """Isolated usage comes from the events; the process figure from the sampler."""

    def test_isolated_usage_and_process_cpu(self, feed, collector, process):
        feed.emit(ev.RUN_STARTED)
        usage = {"cpu_seconds": 0.5, "peak_memory_bytes": 200 * 1024 * 1024, "throttled_seconds": 0.25,
                 "io_read_bytes": 1024 * 1024, "io_write_bytes": 3 * 1024 * 1024}
        feed.state("train", 1.0, usage=usage)
        feed.state("eval", 1.0, usage={**usage, "cpu_seconds": 1.5})
        process.cpu += 0.5  # the scheduler and inline states used half a second
        process.rss = 128 * 1024 * 1024
        assert collector.sample()
        res = collector.metrics(MetricType.RESOURCES)["resources"]
        assert res["isolated_CPU"]["current"] == pytest.approx(100.0)  # 2 s CPU in 2 s
        assert res["process_CPU"]["current"] == pytest.approx(25.0)
        assert res["used_CPU"]["current"] == pytest.approx(125.0)
        assert res["process_memory_mb"]["current"] == pytest.approx(128.0)
        assert res["state_peak_memory_mb"]["max"] == pytest.approx(200.0)
        assert res["state_cpu_seconds"]["sum"] == pytest.approx(2.0)
        assert res["state_io_write_mb"]["sum"] == pytest.approx(6.0)
        assert res["state_throttled_seconds"]["sum"] == pytest.approx(0.5)

    @pytest.mark.parametrize("before", ["at_start", "between_runs", "after_an_idle_window"])
    def test_cpu_spent_while_no_run_is_active_is_no_runs(self, feed, collector, process, clock, before):
        """The window counts active time only: CPU the program spent with no run going (it
        read 200% for runs that only slept) is left out, whenever it came."""
        if before != "at_start":
            feed.emit(ev.RUN_STARTED)
            feed.state("first", 1.0)
            feed.emit(ev.RUN_FINISHED, status="completed")
            if before == "after_an_idle_window":
                process.cpu += 2.0
                clock.advance(1.0)
                collector.sample()
        process.cpu += 5.0  # the program's own work between runs
        clock.advance(5.0)
        feed.run = "r2"
        feed.emit(ev.RUN_STARTED)
        feed.state("sleeps", 1.0)
        process.cpu += 0.1
        feed.emit(ev.RUN_FINISHED, status="completed")
        collector.sample(final=True)
        process_cpu = collector.metrics(MetricType.RESOURCES)["resources"]["process_CPU"]
        assert process_cpu["current"] == pytest.approx(5.0 if before == "between_runs" else 10.0)
        assert process_cpu["max"] == pytest.approx(process_cpu["current"])  # the idle window's 0%, else none

    def test_running_attempts_are_counted_in_the_window_they_use_cpu(self, clock, process):
        live: list[tuple[str, str, int, float]] = []  # what the supervisor would read now
        collector = MetricsCollector(clock=clock, process=process, attempts=lambda: list(live))
        feed = Feed(clock, collector)
        feed.emit(ev.RUN_STARTED)
        feed.emit(ev.STATE_STARTED, "burn", attempt=1)
        clock.advance(1.0)
        live[:] = [("r1", "burn", 1, 0.75), ("other-run", "x", 1, 5.0), ("r1", "burn", 2, 5.0)]
        assert collector.sample()
        isolated = collector.aggregation("resources", "isolated_CPU")
        assert isolated.current == pytest.approx(75.0)  # only this run's attempt, as numbered
        clock.advance(1.0)
        live[:] = [("r1", "burn", 1, 1.75)]
        assert collector.sample()
        assert isolated.current == pytest.approx(100.0)
        clock.advance(0.5)
        live.clear()  # it ended: its end brings the rest of what it used
        feed.emit(ev.STATE_COMPLETED, "burn", attempt=1, duration=2.5, usage={"cpu_seconds": 2.0})
        feed.emit(ev.RUN_FINISHED, status="completed")
        assert collector.sample(final=True)
        assert isolated.current == pytest.approx(50.0)
        assert collector.isolated_cpu_seconds == pytest.approx(2.0)
        assert collector.aggregation("resources", "state_cpu_seconds").sum == pytest.approx(2.0)

    def test_a_retry_counts_from_its_own_start(self, clock, process):
        live: list[tuple[str, str, int, float]] = []
        collector = MetricsCollector(clock=clock, process=process, attempts=lambda: list(live))
        feed = Feed(clock, collector)
        feed.emit(ev.RUN_STARTED)
        feed.emit(ev.STATE_STARTED, "s", attempt=1)
        clock.advance(1.0)
        live[:] = [("r1", "s", 1, 0.5)]
        collector.sample()
        live.clear()
        feed.emit(ev.STATE_FAILED, "s", attempt=1, duration=1.0, usage={"cpu_seconds": 0.6},
                  error="boom", data={"final": False})
        feed.emit(ev.STATE_STARTED, "s", attempt=2)
        clock.advance(1.0)
        live[:] = [("r1", "s", 2, 0.3)]
        collector.sample()
        assert collector.aggregation("resources", "isolated_CPU").current == pytest.approx(40.0)  # 0.1 + 0.3
        assert collector.isolated_cpu_seconds == pytest.approx(0.9)

    def test_a_failing_reader_costs_only_the_live_figure(self, clock, process):
        def broken():
            raise OSError("gone")

        collector = MetricsCollector(clock=clock, process=process, attempts=broken)
        feed = Feed(clock, collector)
        feed.emit(ev.RUN_STARTED)
        feed.emit(ev.STATE_STARTED, "s", attempt=1)
        clock.advance(1.0)
        assert collector.sample()
        feed.emit(ev.STATE_COMPLETED, "s", attempt=1, duration=1.0, usage={"cpu_seconds": 0.5})
        clock.advance(1.0)
        assert collector.sample()
        assert collector.isolated_cpu_seconds == pytest.approx(0.5)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "1.5", None])
    def test_unmeasured_usage_values_are_left_out(self, feed, collector, bad):
        feed.emit(ev.RUN_STARTED)
        usage = dict.fromkeys(("cpu_seconds", "peak_memory_bytes", "throttled_seconds", "io_read_bytes",
                               "io_write_bytes"), bad)
        feed.state("s", 1.0, usage=usage)  # an observer that raised would be detached from the run
        res = collector.metrics(MetricType.RESOURCES)["resources"]
        assert all(res[name]["count"] == 0 for name in ("state_cpu_seconds", "state_peak_memory_mb",
                                                         "state_throttled_seconds", "state_io_read_mb"))
        assert collector.metrics()["state"]["completed"]["sum"] == 1

    def test_allocation_from_started_events(self, feed, collector):
        feed.emit(ev.RUN_STARTED)
        feed.emit(ev.STATE_STARTED, "a", attempt=1, data={"resources": {"cpu_units": 2, "memory_mb": 512}})
        feed.emit(ev.STATE_STARTED, "b", attempt=1, data={"resources": {"cpu_units": 1, "gpu_units": 1}})
        feed.emit(ev.STATE_COMPLETED, "a", attempt=1, duration=0.0)
        res = collector.metrics(MetricType.RESOURCES)["resources"]
        assert res["allocated_CPU"]["max"] == 3.0
        assert res["allocated_CPU"]["current"] == 1.0
        assert res["allocated_memory_mb"]["max"] == 512.0
        assert res["allocated_GPU"]["current"] == 1.0


class TestQueueAndDependencies:
    """Waiting for resources and dependencies is measured from the events."""

    def test_queue_wait_and_depth(self, feed, collector, clock):
        feed.emit(ev.RUN_STARTED)
        feed.emit(ev.STATE_QUEUED, "big", data={"waiting_for": "resources: not enough CPU free"})
        clock.advance(0.3)
        feed.emit(ev.STATE_QUEUED, "big", data={"waiting_for": "resources: not enough CPU free"})  # repeated
        clock.advance(0.2)
        feed.state("big", 1.0)
        data = collector.metrics()
        assert data["queue"]["enqueued"]["sum"] == 1
        assert data["queue"]["depth"]["max"] == 1 and data["queue"]["depth"]["current"] == 0
        assert data["latency"]["queue_wait"]["avg"] == pytest.approx(500.0)
        assert data["latency"]["turnaround"]["avg"] == pytest.approx(1500.0)

    def test_depth_is_recorded_whenever_a_state_leaves_the_queue(self, feed, collector):
        feed.emit(ev.RUN_STARTED)
        for name in ("a", "b", "c", "d"):
            feed.emit(ev.STATE_QUEUED, name, data={"waiting_for": "resources"})
        depth = collector.aggregation("queue", "depth")
        assert depth.current == 4
        feed.emit(ev.STATE_CANCELLED, "a", attempt=1)
        assert depth.current == 3
        feed.emit(ev.STATE_BLOCKED, "b", error="dependency failed")
        assert depth.current == 2
        feed.emit(ev.STATE_PREEMPTED, "c", attempt=1)
        assert depth.current == 1
        feed.emit(ev.RUN_FINISHED, status="cancelled")  # d still waits: it ends with the run
        assert depth.current == 0
        assert depth.count == 8 and depth.min == 0

    def test_states_left_waiting_when_the_run_ends_are_cancelled(self, feed, collector):
        # The engine marks them CANCELLED but sends STATE_CANCELLED only for a started attempt.
        feed.emit(ev.RUN_STARTED)
        feed.state("done", 0.1)
        feed.emit(ev.STATE_QUEUED, "queued", data={"waiting_for": "resources"})
        feed.failure("flaky", 0.1, attempt=1, final=False)
        feed.emit(ev.STATE_RETRYING, "flaky", attempt=1, data={"delay": 5.0})  # its retry never comes
        feed.emit(ev.STATE_STARTED, "paused", attempt=1)
        feed.emit(ev.STATE_PAUSED, "paused", attempt=2, duration=0.1)
        feed.emit(ev.STATE_STARTED, "running", attempt=1)
        feed.emit(ev.STATE_CANCELLED, "running", attempt=1, duration=0.1)  # told: counted once
        feed.failure("doomed", 0.1, attempt=1, final=True)
        feed.emit(ev.RUN_FINISHED, status="failed")
        assert collector.aggregation("state", "cancelled").count == 4  # queued, flaky, paused, running
        assert collector.aggregation("queue", "depth").current == 0

    async def test_cancelled_while_waiting_for_resources(self):
        import asyncio

        from agent import Agent, ResourcePool, ResourceRequirements

        pool = ResourcePool(total_cpu=1, total_memory=1024)  # room for one of x and y at a time
        agent = Agent("waits", isolation="inline", resource_pool=pool)
        queued = asyncio.Event()
        never = asyncio.Event()

        async def start(context):
            return ["x", "y"]

        async def hold(context):
            await never.wait()

        agent.add_state("start", start)
        for name in ("x", "y"):
            agent.add_state(name, hold, resources=ResourceRequirements(cpu_units=1, memory_mb=10))
        collector = MetricsCollector()
        agent.add_observer(collector)
        agent.add_observer(lambda event: queued.set() if event.kind == ev.STATE_QUEUED else None)
        run = asyncio.create_task(agent.run(timeout=30))
        await queued.wait()
        await agent.cancel_all()
        await asyncio.gather(run, return_exceptions=True)
        statuses = [str(meta.status) for meta in agent.state_metadata.values()]
        data = collector.metrics()
        assert data["state"]["cancelled"]["count"] == sum("CANCELLED" in s for s in statuses) == 2
        assert data["queue"]["depth"]["current"] == 0 and data["queue"]["depth"]["max"] == 1

    async def test_cancelled_while_waiting_for_max_concurrent(self):
        """It waits in the queue as one waiting for resources does, and is told so
        (STATE_QUEUED): before, it was counted in neither the queue nor the cancelled."""
        import asyncio

        from agent import Agent

        agent = Agent("concurrency", isolation="inline", max_concurrent=1)
        started = asyncio.Event()
        never = asyncio.Event()

        async def start(context):
            return ["x", "y"]

        async def hold(context):
            started.set()
            await never.wait()

        agent.add_state("start", start)
        agent.add_state("x", hold)
        agent.add_state("y", hold)
        collector = MetricsCollector()
        agent.add_observer(collector)
        queued: list[tuple[str | None, str]] = []
        agent.add_observer(lambda e: e.kind == ev.STATE_QUEUED and queued.append((e.state, e.data["waiting_for"])))
        run = asyncio.create_task(agent.run(timeout=30))
        await started.wait()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        data = collector.metrics()
        assert queued == [("y", "max_concurrent=1")]  # said once, though each pass finds it waiting
        assert data["state"]["cancelled"]["count"] == 2 and data["queue"]["enqueued"]["count"] == 1

    def test_queue_processing_rate_per_window(self, feed, collector, clock):
        feed.emit(ev.RUN_STARTED)
        for name in ("a", "b", "c"):
            feed.emit(ev.STATE_QUEUED, name, data={"waiting_for": "resources"})
        clock.advance(0.5)
        feed.state("a", 0.5)  # taken off the queue, and so is b; c waits; d never queued
        feed.state("b", 0.5)
        feed.state("d", 0.5)
        assert collector.sample()
        rate = collector.metrics()["throughput"]["queue_processing_rate"]
        assert (rate["count"], rate["current"]) == (1, pytest.approx(2 / 2.0))  # 2 taken off in 2 s

    def test_dependency_resolution_in_both_categories(self, feed, collector):
        feed.emit(ev.RUN_STARTED)
        feed.emit(ev.DEPENDENCY_RESOLVED, "join", duration=0.75, data={"chain_length": 2})
        feed.emit(ev.STATE_BLOCKED, "child", error="dependency failed")
        data = collector.metrics()
        assert data["dependency"]["chain_length"]["max"] == 2
        assert data["timing"]["dependency_resolution"]["avg"] == pytest.approx(750.0)
        assert data["dependency"]["resolution_time"]["avg"] == pytest.approx(750.0)
        assert data["dependency"]["resolved"]["sum"] == 1
        assert data["dependency"]["blocked"]["sum"] == 1


class TestLiveView:
    """The live snapshot lists running runs and states, and recent finished runs."""

    def test_running_and_recent(self, clock, collector):
        a = Feed(clock, collector, agent="etl", run="r1")
        b = Feed(clock, collector, agent="train", run="r2")
        a.emit(ev.RUN_STARTED)
        b.emit(ev.RUN_STARTED)
        a.state("extract", 1.0)
        a.emit(ev.STATE_STARTED, "transform", attempt=1)
        b.emit(ev.STATE_STARTED, "epoch", attempt=2)
        clock.advance(2.0)
        live = collector.live()
        assert [run.agent_name for run in live.active] == ["etl", "train"]
        etl = live.active[0]
        assert etl.completed == 1 and etl.elapsed == pytest.approx(3.0)
        assert [(s.state, s.attempt, s.running_for) for s in etl.running] == [("transform", 1, 2.0)]
        b.emit(ev.RUN_FINISHED, status="cancelled")
        live = collector.live()
        assert [run.run_id for run in live.active] == ["r1"]
        assert live.recent[0].run_id == "r2" and live.recent[0].status == "cancelled"
        assert live.recent[0].running == ()
        assert collector.active_runs == 1

    def test_events_of_a_run_seen_mid_way(self, clock, collector):
        feed = Feed(clock, collector, run="late")
        feed.state("x", 1.0)  # no RUN_STARTED seen
        assert collector.active_runs == 1
        feed.emit(ev.RUN_FINISHED, status="completed")
        assert collector.active_runs == 0

    @pytest.mark.parametrize("reset", ["yes", 1, None])
    def test_reset_is_true_or_false(self, collector, reset):
        with pytest.raises(MonitorConfigurationError, match="reset"):
            collector.metrics(reset=reset)

    def test_reset_keeps_runs(self, feed, collector):
        run_chain(feed, states=2)
        feed.run = "r2"
        feed.emit(ev.RUN_STARTED)
        data = collector.metrics(reset=True)
        assert data["state"]["completed"]["sum"] == 2
        assert collector.metrics()["state"]["completed"]["sum"] == 0
        assert collector.active_runs == 1


class TestObserving:
    """The collector is a plain observer for the ambient mechanism."""

    def test_works_with_observing(self, collector):
        with ev.observing(collector):
            for observer in ev.ambient_observers():
                observer(ev.RunEvent(ev.RUN_STARTED, "wf", "r1"))
        assert collector.active_runs == 1

    def test_unknown_kinds_are_ignored(self, collector):
        collector(ev.RunEvent("something_new", "wf", "r1"))
        assert collector.active_runs == 0


def test_default_sampler_reads_this_process():
    collector = MetricsCollector()
    collector(ev.RunEvent(ev.RUN_STARTED, "wf", "r1"))
    assert collector.sample(final=True)
    res = collector.metrics(MetricType.RESOURCES)["resources"]
    assert res["process_memory_mb"]["current"] > 1.0


class TestBadInput:
    """A wrong argument is a MonitorConfigurationError naming what to give, and changes nothing."""

    @pytest.mark.parametrize("call", [
        lambda c: c.metrics("timing"),
        lambda c: c.metrics(5),
        lambda c: c.aggregation("timing", "nope"),
        lambda c: c.aggregation("nope", "count"),
        lambda c: c.sample(float("nan")),
        lambda c: c.sample(float("inf")),
        lambda c: c.sample(True),
    ], ids=["metrics str", "metrics int", "unknown name", "unknown category", "sample nan", "sample inf",
            "sample bool"])
    def test_refused(self, call):
        from agent.errors import MonitorConfigurationError

        collector = MetricsCollector()
        with pytest.raises(MonitorConfigurationError):
            call(collector)
        assert collector.sample() is False  # nothing was added, and the windows still work

    @pytest.mark.parametrize("capacity", ["5", 2.5, True, 0])
    def test_aggregation_capacity(self, capacity):
        from agent.errors import MonitorConfigurationError
        from agent.monitor.aggregation import MetricAggregation

        with pytest.raises(MonitorConfigurationError, match="capacity"):
            MetricAggregation(capacity=capacity)


class TestFailureKinds:
    """errors.<kind> counts each failed attempt by why it failed: they add up to errors.count."""

    async def test_each_kind_is_counted(self):
        import asyncio
        import os

        from agent import Agent, StateFailedError

        agent = Agent("kinds", isolation="process", on_failure="continue")

        async def start(context):
            return ["raises", "exits", "hangs"]

        async def raises(context):
            raise KeyError("missing")

        async def exits(context):
            os._exit(3)

        async def hangs(context):
            await asyncio.sleep(60)

        agent.add_state("start", start, isolation="inline")
        agent.add_state("raises", raises, max_retries=1)
        agent.add_state("exits", exits, max_retries=0)
        agent.add_state("hangs", hangs, max_retries=0, timeout=0.5)
        collector = MetricsCollector()
        agent.add_observer(collector)
        with pytest.raises(StateFailedError):
            await agent.run()
        errors = collector.metrics(MetricType.ERRORS)["errors"]
        counts = {kind: errors[kind]["sum"] for kind in ("exception", "exit_code", "timeout", "signal", "limit")}
        assert counts == {"exception": 2, "exit_code": 1, "timeout": 1, "signal": 0, "limit": 0}
        assert errors["count"]["sum"] == 4
