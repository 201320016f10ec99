"""Metrics of an isolated run carry the CPU and memory its cgroup measured."""

from __future__ import annotations

import pytest

from agent import Agent, ResourceRequirements
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
