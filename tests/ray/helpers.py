"""Helpers shared by the Ray tests."""

from __future__ import annotations

import psutil
import pytest

from agent import Agent, StateFailedError


async def failure_of(agent: Agent) -> StateFailedError:
    """Run ``agent``, which must fail; the error ``run()`` raised."""
    with pytest.raises(StateFailedError) as caught:
        await agent.run()
    return caught.value


def worker_gone(pid: int) -> bool:
    """Whether the Ray worker ``pid`` has exited (Ray reaps it; waits up to 10 s)."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    _, alive = psutil.wait_procs([proc], timeout=10)
    return not alive
