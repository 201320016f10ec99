"""Agents with ``isolation="process"`` and ``"worker"``: the spec's workflows, failures and cancellation."""

from __future__ import annotations

import asyncio
import enum
import os

import pytest

from agent import Agent, AgentStatus, Context
from agent.errors import StateFailedError, StateTimeoutError
from agent.executor import Isolation

from .helpers import state_process_gone


async def process_data(context):
    context.set_state("greeting", "Hello, World!")
    context.set_state("pid", os.getpid())
    return "format_output"


async def format_output(context):
    print(f"Result: {context.get_state('greeting')}")
    context.set_state("formatted", f"<<{context.get_state('greeting')}>>")
    return None


async def fan_out(context):
    return [f"branch_{i}" for i in range(4)]


async def branch(context):
    context.set_state(f"done_{context.state_name}", os.getpid())
    return "merge"


async def merge(context):
    context.set_state("merged", sorted(k for k in context.keys() if k.startswith("done_")))
    return None


class Step(str, enum.Enum):
    """State names as an enum: a str subclass, returned as the names they spell."""

    BRANCH_0 = "branch_0"
    BRANCH_1 = "branch_1"
    MERGE = "merge"


async def enum_fan_out(context):
    return [Step.BRANCH_0, Step.BRANCH_1]


async def enum_branch(context):
    context.set_state(f"done_{context.state_name}", os.getpid())
    return Step.MERGE


async def crashing(context):
    raise RuntimeError("disk full")


async def sleeper(context):
    context.set_state("pid", os.getpid())
    await asyncio.sleep(3600)


class TestAgentWithProcessIsolation:
    """The scheduler's states run in children (or workers) and their writes reach the run's context."""

    async def test_quickstart(self, level):
        agent = Agent("hello_workflow", isolation=level)
        agent.add_state("process_data", process_data)
        agent.add_state("format_output", format_output)
        ctx = await agent.run()
        assert agent.status is AgentStatus.COMPLETED
        assert ctx.get_state("formatted") == "<<Hello, World!>>"
        assert ctx.get_state("pid") != os.getpid()
        assert "Result: Hello, World!" in agent.logs("format_output")

    async def test_fan_out_and_join(self, level):
        agent = Agent("fan", isolation=level)
        agent.add_state("fan_out", fan_out)
        for i in range(4):
            agent.add_state(f"branch_{i}", branch)
        agent.add_state("merge", merge)
        ctx = await agent.run()
        assert ctx.get_state("merged") == [f"done_branch_{i}" for i in range(4)]
        pids = {ctx.get_state(f"done_branch_{i}") for i in range(4)}
        assert os.getpid() not in pids
        if level is Isolation.PROCESS:
            assert len(pids) == 4  # a fresh process each (workers are reused)

    @pytest.mark.parametrize("where", ["inline", "isolated"])
    async def test_names_of_a_str_subclass_are_the_names_they_spell(self, level, where):
        agent = Agent("enum_names", isolation="inline" if where == "inline" else level)
        agent.add_state("fan_out", enum_fan_out)
        for name in ("branch_0", "branch_1"):
            agent.add_state(name, enum_branch)
        agent.add_state("merge", merge)
        seen = []
        agent.add_observer(lambda event: event.kind == "state_completed" and seen.append(event.data["next"]))
        ctx = await agent.run()
        assert ctx.get_state("merged") == ["done_branch_0", "done_branch_1"]
        assert agent.state_metadata["merge"].runs == 1  # the join held for both branches
        assert len(seen) == 4 and all(type(n) is str for names in seen for n in names)

    async def test_failure_carries_the_childs_traceback(self, level):
        agent = Agent("failing", isolation=level)
        agent.add_state("crashing", crashing, max_retries=1)
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        assert info.value.attempts == 2
        assert info.value.reason.kind == "exception"
        assert "disk full" in str(info.value) and "crashing" in info.value.traceback

    async def test_state_timeout_stops_the_state(self, level):
        agent = Agent("slow", isolation=level)
        agent.add_state("sleeper", sleeper, timeout=3)  # covers the start of the process too: room for a cold zygote
        with pytest.raises(StateTimeoutError):
            await agent.run()
        assert state_process_gone(agent.context.get_state("pid"))

    async def test_cancelled_run_leaves_nothing_behind(self, level):
        agent = Agent("cancelled", isolation=level)
        agent.add_state("sleeper", sleeper)
        started = asyncio.Event()
        # The state's first write, applied to the run's context, is the handshake.
        agent.context = Context(on_write=lambda key, value, deleted: key == "pid" and started.set())
        run = asyncio.ensure_future(agent.run())
        await started.wait()
        pid = agent.context.get_state("pid")
        await agent.cancel_all()
        await run
        assert agent.status is AgentStatus.CANCELLED
        assert state_process_gone(pid)
