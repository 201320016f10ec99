"""Coordination holds for isolated states: admission happens in the supervisor."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent import Context
from agent.coordination import Coordinator, PrimitiveType, create_coordinated_agent

supervisor = pytest.importorskip("agent.supervisor", reason="process isolation is not built in this tree")
if not hasattr(supervisor, "get_executor"):
    pytest.skip("process isolation is not built in this tree", allow_module_level=True)


class TestIsolatedMutex:
    """A MUTEX on database_write admits one isolated child at a time, across concurrent runs."""

    async def test_one_child_inside(self, tmp_path: Path) -> None:
        log = str(tmp_path / "inside.log")

        def make_state():
            async def database_write(context: Context):
                import os
                import time

                with open(log, "a") as f:
                    f.write(f"enter {os.getpid()}\n")
                    f.flush()
                    time.sleep(0.05)  # the work: long enough for a second child to overlap, were it let in
                    f.write(f"exit {os.getpid()}\n")
                return None

            return database_write

        coordinator = Coordinator()
        agents = []
        for i in range(3):
            agent = create_coordinated_agent(f"writer{i}", coordinator=coordinator, isolation="process")
            agent.add_state_coordination("database_write", PrimitiveType.MUTEX, ttl=30.0)
            agent.add_state("database_write", make_state())
            agents.append(agent)
        await asyncio.gather(*(a.run() for a in agents))
        await coordinator.aclose()
        lines = Path(log).read_text().split()
        events = list(zip(lines[0::2], lines[1::2]))
        assert len(events) == 6
        for (kind_in, pid_in), (kind_out, pid_out) in zip(events[0::2], events[1::2]):
            assert (kind_in, kind_out) == ("enter", "exit") and pid_in == pid_out
