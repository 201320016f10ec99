"""Metrics of an isolated run carry the CPU and memory its cgroup measured."""

from __future__ import annotations

import os
import time

import pytest

from agent import Agent, ResourceRequirements, StateStatus
from agent.monitor import RealTimeMetrics
from agent_monitor import MetricType, agent_monitor


async def burn(context):
    import time

    block = bytearray(40 * 1024 * 1024)  # 40 MiB, touched page by page below
    for i in range(0, len(block), 4096):
        block[i] = 1
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    context.set_state("burned", len(block))


async def burn_until_told(context):
    import os
    import time

    stop, give_up = context.get_state("stop_file"), time.monotonic() + 30.0
    while not os.path.exists(stop) and time.monotonic() < give_up:
        for _ in range(20_000):
            pass


@pytest.mark.cgroup
class TestIsolatedUsage:
    """The resources category shows what the kernel measured for a process state."""

    async def test_cpu_and_peak_memory_are_measured(self):
        agent = Agent("measured", isolation="process")
        agent.add_state("burn", burn, resources=ResourceRequirements(cpu_units=1, memory_mb=256))

        @agent_monitor(metrics=MetricType.RESOURCES)
        async def run():
            await agent.run()

        await run()
        resources = run.last_metrics["resources"]
        assert resources["state_cpu_seconds"]["max"] >= 0.25
        assert resources["state_peak_memory_mb"]["max"] >= 40
        usage = agent.state_metadata["burn"].usage
        assert usage["cpu_seconds"] >= 0.25 and usage["peak_memory_bytes"] >= 40 * 1024 * 1024

    @pytest.mark.parametrize("isolation", ["process", "worker"])
    async def test_cpu_is_reported_while_the_attempt_runs(self, tmp_path, isolation):
        """Each update counts the CPU the attempt used in its window, read from its cgroup
        as it runs; the updates add up to what the attempt measured at its end."""
        stop = tmp_path / "stop"
        agent = Agent("live-cpu", isolation=isolation)
        agent.add_state("burn", burn_until_told, resources=ResourceRequirements(cpu_units=1, memory_mb=256))
        rt = RealTimeMetrics(update_interval=0.25, metrics=MetricType.RESOURCES)
        seen: list[tuple[float, bool, float, float]] = []  # (when, running, isolated %, used %)

        def update(metrics):
            resources = metrics["resources"]
            running = agent.state_metadata["burn"].status is StateStatus.RUNNING
            seen.append((time.monotonic(), running, resources["isolated_CPU"]["current"],
                         resources["used_CPU"]["current"]))
            if sum(1 for _, r, _, _ in seen if r) >= 6:
                stop.touch()  # six updates came while it ran: let it end

        rt.subscribe(update)
        began = time.monotonic()
        rt.start()
        try:
            await agent.run(initial_context={"stop_file": str(stop)})
        finally:
            await rt.stop()
        assert stop.exists(), f"fewer than six updates while the state ran: {seen}"
        while_running = [isolated for _, running, isolated, _ in seen if running]
        assert max(while_running) >= 40.0, f"isolated_CPU while it ran: {while_running}"
        cores = os.cpu_count() or 1
        assert max(used for *_, used in seen) <= cores * 100.0 * 1.1 + 10.0, seen
        measured = agent.state_metadata["burn"].usage["cpu_seconds"]
        assert measured >= 0.5
        assert rt.collector.isolated_cpu_seconds == pytest.approx(measured, rel=0.01)
        # The figures themselves, weighted by the time between updates, say as much.
        total, last = 0.0, began
        for when, _, isolated, _ in seen:
            total += isolated / 100.0 * (when - last)
            last = when
        assert total == pytest.approx(measured, rel=0.15)
