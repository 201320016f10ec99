"""ray_options(isolation="process"): the node's kernel limits hold inside a Ray task."""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("ray")

from agent import Agent, ResourceRequirements
from agent.human import QueueInputProvider

from . import states
from .helpers import failure_of

pytestmark = [
    pytest.mark.ray, pytest.mark.cgroup, pytest.mark.usefixtures("ray_cluster"),
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root"),
]

LIMITED = ResourceRequirements(cpu_units=1, memory_mb=64)


class TestConfinedOnTheNode:
    """A confined Ray state runs in a child in its own cgroup, with the state's limits."""

    async def test_memory_limit_kills_the_state_with_the_kernels_reason(self):
        agent = Agent("confined_hog", isolation="ray")
        agent.add_state("hog", states.confined_hog, resources=LIMITED)
        reason = (await failure_of(agent)).reason
        assert reason.kind == "limit"
        assert "memory limit 64 MiB" in reason.message
        assert "hog in" in agent.logs("hog")
        assert not agent.context.has_state("allocated")

    async def test_writes_human_input_and_usage_cross_both_boundaries(self):
        provider = QueueInputProvider()
        agent = Agent("confined", isolation="ray", human_input=provider)
        agent.add_state("work", states.confined_worker, resources=LIMITED)
        run = asyncio.ensure_future(agent.run())
        question = await provider.wait_for_request()
        assert agent.context.get_state("allocated") == 16 * 1024 * 1024  # arrived while it waits
        provider.answer(question.id, "yes")
        ctx = await run
        assert ctx.get_state("answer") == "yes"
        usage = agent.state_metadata["work"].usage
        assert usage["ray_worker_pid"] != ctx.get_state("confined_pid")  # a child of the Ray worker
        assert usage["peak_memory_bytes"] >= 16 * 1024 * 1024  # read from its cgroup
        cgroup_lines = ctx.get_state("cgroup")
        assert "memory:/" in cgroup_lines and "agent" in cgroup_lines.split("memory:")[1].splitlines()[0]
        assert agent.logs("work") == f"confined in {ctx.get_state('confined_pid')}\n"  # once, as printed
