"""Through the public API: an isolated state that breaks its limit fails with the kernel's reason."""

from __future__ import annotations

import asyncio

import pytest

from agent import Agent
from agent.errors import StateFailedError
from agent.resources import ResourceRequirements

from .agent_states import bomb, hog, modest, nothing, stubborn_bomb
from .helpers import BACKEND

try:
    from agent.supervisor import get_executor  # noqa: F401
except ImportError:  # the process executor is not installed in this tree
    get_executor = None

pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(BACKEND is None, reason="needs root and cgroup v1 or v2"),
    pytest.mark.skipif(get_executor is None, reason="needs the process executor (agent.supervisor)"),
]


def _agent(name: str, func, resources: ResourceRequirements) -> Agent:
    agent = Agent(name, isolation="process")
    agent.add_state("work", func, resources=resources, max_retries=0)
    return agent


class TestLimitsThroughTheAgent:
    """run() raises StateFailedError naming the limit; other runs and states are unaffected."""

    async def test_memory_limit_fails_the_state_and_spares_a_concurrent_run(self):
        failing = _agent("hog", hog, ResourceRequirements(memory_mb=64))
        healthy = _agent("modest", modest, ResourceRequirements(memory_mb=64))
        results = await asyncio.gather(failing.run(), healthy.run(), return_exceptions=True)
        error, context = results
        assert isinstance(error, StateFailedError), error
        assert error.state == "work"
        assert error.reason.kind == "limit"
        assert "killed: memory limit 64 MiB" in str(error)
        assert context.get_state("allocated") == 16 * 1024 * 1024

    async def test_fork_bomb_is_contained_and_reported(self):
        agent = _agent("bomb", bomb, ResourceRequirements(pids_max=32))
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        assert "pids limit 32" in str(info.value)

    @pytest.mark.parametrize("isolation", ["process", "worker"])
    async def test_a_fork_bomb_that_ignores_refused_forks_times_out_naming_the_pids_limit(self, isolation):
        agent = Agent("stubborn", isolation=isolation)
        agent.add_state("work", stubborn_bomb, resources=ResourceRequirements(pids_max=16), timeout=1, max_retries=0)
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        reason = info.value.reason
        assert reason.kind == "timeout" and "pids limit 16 reached" in reason.message
        assert reason.details["limit"] == "pids" and reason.details["refused"] > 0


async def test_a_states_cpu_time_is_counted_up_to_its_result():
    # The supervisor reads the cgroup as soon as the result comes, while the process still
    # runs; the kernel adds a running thread's CPU time to its cgroup only at the next
    # scheduler tick or when it stops running. Read so, a state that does nothing often
    # read as 0 s (4 of 30 in one run here): its process ran from its launch to its
    # result without stopping. Every one of them ran: each must read more than nothing.
    for i in range(60):
        agent = Agent(f"nothing{i}", isolation="process")
        agent.add_state("nothing", nothing)
        await agent.run()
        assert agent.state_metadata["nothing"].usage["cpu_seconds"] > 0, f"run {i}"
        await asyncio.sleep(0.02)  # a child parked meanwhile serves the next one
