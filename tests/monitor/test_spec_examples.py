"""The README's monitoring examples, as written (examples/monitoring_*.py), on real inline runs."""

from __future__ import annotations

import asyncio
import logging
import runpy
from pathlib import Path

import pytest

from agent import Agent, RetryPolicy, StateFailedError, events
from agent_monitor import MetricAggregation, MetricType, RealTimeMetrics, agent_monitor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    assert events.ambient_observers() == ()


async def assert_no_tasks_left():
    await asyncio.sleep(0)  # let finished tasks be reaped
    assert asyncio.all_tasks() == {asyncio.current_task()}


class TestBasicMonitoring:
    """Nested decorators both see the run; the callback gets the final figures."""

    async def test_as_written(self, capsys):
        ns = load("monitoring_basic")
        await ns["run_monitored"]()
        outer = ns["run_monitored"].last_metrics
        inner = ns["run_workflow"].last_metrics
        for metrics in (outer, inner):
            assert metrics["state"]["completed"]["sum"] == 4
            assert metrics["timing"]["total_execution"]["count"] == 4
            assert metrics["throughput"]["states_per_second"]["avg"] > 0
            assert metrics["errors"]["count"]["sum"] == 0
        out = capsys.readouterr().out
        assert "Current throughput: " in out and "Resource usage: " in out
        await assert_no_tasks_left()


class TestSelectiveCollection:
    """Only the selected categories are collected."""

    async def test_as_written(self):
        ns = load("monitoring_selective")
        await ns["run_optimized"]()
        metrics = ns["run_optimized"].last_metrics
        assert set(metrics) == {"timing", "resources", "throughput"}
        assert metrics["timing"]["total_execution"]["count"] == 10  # split, 8 shards, combine
        assert metrics["timing"]["run_duration"]["count"] == 1
        assert metrics["resources"]["process_memory_mb"]["current"] > 0


class TestCustomAggregation:
    """A defaultdict(MetricAggregation) fed from the callback computes KPIs."""

    async def test_as_written(self, capsys):
        ns = load("monitoring_custom_aggregation")
        handler = ns["metrics_handler"]
        await ns["run_with_custom_metrics"]()
        assert handler.metrics["throughput_states_per_second"].count >= 1
        assert handler.metrics["throughput_states_per_second"].avg > 0
        assert handler.metrics["resources_used_CPU"].avg > 0  # the states burn real CPU inline
        assert isinstance(handler.metrics["errors_count"], MetricAggregation)
        assert "Workflow efficiency: " in capsys.readouterr().out
        last = ns["run_with_custom_metrics"].last_metrics
        assert last["state"]["completed"]["sum"] == 100


class TestPerformanceAnalysis:
    """P95 latency in ms and throughput reach the analysis callback."""

    async def test_as_written(self, caplog):
        ns = load("monitoring_performance")
        with caplog.at_level(logging.INFO):
            await ns["analyze_performance"]()
        metrics = ns["analyze_performance"].last_metrics
        assert set(metrics) == {"timing", "throughput", "latency"}
        execution = metrics["timing"]["total_execution"]
        assert execution["count"] == 7
        assert execution["min"] <= execution["p95"] <= execution["max"]
        assert "P95 Latency: " in caplog.text and "Avg Throughput: " in caplog.text

    async def test_spec_body_as_written(self):
        """The README's own body: an agent with no states added yet still runs and reports."""
        @agent_monitor(metrics=MetricType.TIMING | MetricType.THROUGHPUT | MetricType.LATENCY)
        async def analyze_performance():
            agent = Agent("performance_workflow", isolation="inline")

            async def only(context):
                return None

            agent.add_state("only", only)
            await agent.run()

        await analyze_performance()
        assert analyze_performance.last_metrics["timing"]["total_execution"]["count"] == 1


class TestDashboard:
    """RealTimeMetrics started without await inside the monitored coroutine, as written."""

    async def test_as_written(self, capsys):
        ns = load("monitoring_dashboard")
        await ns["run_with_dashboard"]()
        out = capsys.readouterr().out
        assert "=== Workflow Dashboard ===" in out
        final = ns["run_with_dashboard"].last_metrics
        assert final["errors"]["count"]["sum"] == 2  # flaky_upload failed twice, then succeeded
        assert final["retries"]["count"]["sum"] == 2
        assert final["state"]["completed"]["sum"] == 51
        assert "Errors: 2\n" in out
        rt = ns["dashboard"].rt_metrics
        assert not rt.running
        # the dashboard's own RealTimeMetrics saw the same run through the ambient mechanism
        assert rt.collector.live().recent[0].agent_name == "dashboard_workflow"
        assert rt.metrics()["errors"]["count"]["sum"] == 2
        await assert_no_tasks_left()


class TestRealRuns:
    """Counts match what the runs did, for failures, fan-outs and several runs."""

    async def test_failures_and_retries(self):
        failures = {"left": 3}

        @agent_monitor()
        async def workflow():
            agent = Agent("flaky", isolation="inline")

            async def start(context):
                return ["flaky", "steady"]

            async def flaky(context):
                if failures["left"] > 0:
                    failures["left"] -= 1
                    raise RuntimeError("not yet")
                return "done"

            async def steady(context):
                return "done"

            async def done(context):
                return None

            agent.add_state("start", start)
            agent.add_state("flaky", flaky, retry_policy=RetryPolicy(max_retries=5, initial_delay=0, jitter=False))
            agent.add_state("steady", steady)
            agent.add_state("done", done)
            await agent.run()
            return "finished"

        assert await workflow() == "finished"
        m = workflow.last_metrics
        assert m["errors"]["count"]["sum"] == 3
        assert m["errors"]["failed_states"]["sum"] == 0
        assert m["retries"]["count"]["sum"] == 3
        assert m["retries"]["attempts_per_state"]["max"] == 4
        assert m["state"]["started"]["sum"] == 7
        assert m["timing"]["total_execution"]["count"] == 4
        assert m["concurrency"]["running_states"]["max"] >= 1

    async def test_final_failure_is_reported_and_raised(self):
        @agent_monitor()
        async def workflow():
            agent = Agent("doomed", isolation="inline")

            async def bad(context):
                raise ValueError("always")

            agent.add_state("bad", bad, max_retries=1)
            await agent.run()

        with pytest.raises(Exception, match="always"):
            await workflow()
        m = workflow.last_metrics
        assert m["errors"]["count"]["sum"] == 2
        assert m["errors"]["failed_states"]["sum"] == 1
        assert m["state"]["success_rate"]["avg"] == 0.0

    async def test_realtime_metrics_over_several_runs(self):
        rt = RealTimeMetrics(update_interval=60.0)
        updates = []
        rt.subscribe(updates.append)
        rt.start()
        for _ in range(3):
            agent = Agent("repeat", isolation="inline")

            async def one(context):
                return None

            agent.add_state("one", one)
            await agent.run()
        await rt.stop()
        assert len(updates) == 1  # the final update; the 60 s timer never fired
        assert updates[0]["timing"]["run_duration"]["count"] == 3
        assert updates[0]["state"]["completed"]["sum"] == 3
        await assert_no_tasks_left()

    async def test_agent_add_observer(self):
        rt = RealTimeMetrics()
        agent = Agent("observed", isolation="inline")

        async def one(context):
            return None

        agent.add_state("one", one)
        agent.add_observer(rt.observer)
        await agent.run()  # not started: the observer ignores events
        assert rt.collector.live().recent == ()
        rt.start()
        await agent.run()
        await rt.stop()
        assert rt.metrics()["state"]["completed"]["sum"] == 1


class TestAllocation:
    """What running states hold from the resource pool shows up as allocated_*."""

    async def test_fan_out_with_resources(self):
        from agent import ResourcePool, ResourceRequirements

        release = asyncio.Event()
        started = []

        @agent_monitor(metrics=MetricType.RESOURCES)
        async def workflow():
            pool = ResourcePool(total_cpu=8, total_memory=4096, total_gpu=0)
            agent = Agent("alloc", isolation="inline", resource_pool=pool)

            async def start(context):
                return ["a", "b"]

            async def hold(context):
                started.append(1)
                if len(started) == 2:
                    release.set()
                await release.wait()
                return None

            agent.add_state("start", start)
            req = ResourceRequirements(cpu_units=2, memory_mb=512)
            agent.add_state("a", hold, resources=req)
            agent.add_state("b", hold, resources=req)
            await agent.run()

        await workflow()
        res = workflow.last_metrics["resources"]
        assert res["allocated_CPU"]["max"] == 4.0
        assert res["allocated_memory_mb"]["max"] == 1024.0
        assert res["allocated_CPU"]["current"] == 0.0


class TestPrometheusExample:
    """The exporter example serves the runs' figures over loopback."""

    async def test_example(self, capsys):
        ns = load("monitoring_prometheus")
        body = await ns["main"]()
        assert "agent_state_completed_total 12.0" in body  # 3 runs of 4 states
        assert "agent_timing_run_duration_milliseconds_count 3.0" in body


class TestRealRunCounts:
    """What real runs count: failures are failures, blocked dependencies are blocked, chains are long."""

    async def test_a_state_that_fails_under_continue_is_failed_not_blocked(self):
        seen: list[events.RunEvent] = []

        async def flaky(context):
            raise RuntimeError("boom")

        async def after(context):
            return None

        @agent_monitor(metrics=MetricType.DEPENDENCY | MetricType.ERRORS)
        async def workflow():
            agent = Agent("continue", on_failure="continue")
            agent.add_state("flaky", flaky, max_retries=0)
            agent.add_state("needs_flaky", after, dependencies={"flaky": "required"})
            with pytest.raises(StateFailedError, match="'flaky' failed"):
                await agent.run()
            return agent.state_metadata

        with events.observing(seen.append):
            meta = await workflow()
        data = workflow.last_metrics
        assert meta["flaky"].status.value == "failed" and meta["needs_flaky"].status.value == "blocked"
        assert data["errors"]["failed_states"]["sum"] == 1
        assert data["dependency"]["blocked"]["sum"] == 1  # needs_flaky only
        assert [(e.kind, e.state) for e in seen if e.kind == events.STATE_BLOCKED] == [
            (events.STATE_BLOCKED, "needs_flaky")]
        final = [e for e in seen if e.kind == events.STATE_FAILED]
        assert [(e.data["final"], e.data["run_goes_on"]) for e in final] == [(True, True)]

    async def test_dependency_chain_length_of_a_real_run(self):
        async def step(context):
            return None

        @agent_monitor(metrics=MetricType.DEPENDENCY)
        async def workflow():
            agent = Agent("chain")
            agent.add_state("extract", step)
            agent.add_state("transform", step, dependencies={"extract": "required"})
            agent.add_state("load", step, dependencies={"transform": "required", "extract": "required"})
            await agent.run()

        await workflow()
        chain = workflow.last_metrics["dependency"]["chain_length"]
        assert (chain["count"], chain["min"], chain["max"]) == (2, 1, 2)  # transform: 1, load: 2
