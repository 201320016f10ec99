"""What a finished run leaves behind: nothing the garbage collector must find, ids never reused."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref

from agent import Agent, AgentStatus, ResourceRequirements
from agent.agent import _new_run_id  # what the child would give its next run


async def _steps(context):
    return "last"


async def _sleeps(context):
    await asyncio.sleep(0)
    return "last"


async def _last(context):
    context.set_state("done", True)
    return None


def _agent(first) -> Agent:
    agent = Agent("lifetime", isolation="inline")
    agent.add_state("first", first, resources=ResourceRequirements(cpu_units=0.01, memory_mb=1.0))
    agent.add_state("last", _last)
    return agent


class TestFreedAtOnce:
    async def test_a_dropped_agent_is_freed_without_the_collector(self):
        for first in (_steps, _sleeps):  # ended without the event loop, and through a task
            agent = _agent(first)
            await agent.run()
            assert agent.status is AgentStatus.COMPLETED
            ref = weakref.ref(agent)
            gc.disable()
            try:
                del agent
                assert ref() is None, f"{first.__name__}: a reference cycle kept the agent alive"
            finally:
                gc.enable()

    async def test_a_finished_run_still_answers_while_its_agent_lives(self):
        agent = _agent(_steps)
        await agent.run()
        checkpoint = agent.create_checkpoint()
        assert checkpoint.completed_states == {"first", "last"}
        assert agent.priority_queue == []
        assert agent.context.get_state("done") is True
        await agent.run()  # and the agent runs again
        assert agent.status is AgentStatus.COMPLETED


class TestRunIds:
    async def test_ids_are_distinct_and_hex(self):
        agent = _agent(_steps)
        ids = set()
        for _ in range(200):  # more than one batch of ids
            await agent.run()
            assert len(agent.run_id) == 32 and int(agent.run_id, 16) >= 0
            ids.add(agent.run_id)
        assert len(ids) == 200

    async def test_a_forked_child_never_repeats_its_parents_ids(self):
        agent = _agent(_steps)
        await agent.run()  # the parent holds unused ids now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the id its next run would get, to the parent
            try:
                os.close(read)
                os.write(write, _new_run_id().encode())
            finally:
                os._exit(0)
        os.close(write)
        try:
            child_id = os.read(read, 64).decode()
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        await agent.run()
        assert len(child_id) == 32
        assert child_id != agent.run_id
