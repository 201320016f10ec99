"""What a finished run leaves behind: nothing the garbage collector must find, ids never reused."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import weakref

import pytest

from agent import (
    Agent,
    AgentStatus,
    EventLoopRunningError,
    InvalidConfigurationError,
    ResourceRequirements,
    RunTimeoutError,
    StateFailedError,
    StateStatus,
)
from agent._compiled import compiled_path
from agent.agent import _new_run_id  # what the child would give its next run
from agent.checkpoint_store import SQLiteCheckpointStore
from agent.state import StateMetadata


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


class TestMetadataLayout:
    @pytest.mark.skipif(compiled_path("agent.state") is not None,
                        reason="compiled, StateMetadata's fields are fixed slots: a run cannot add one")
    async def test_a_run_adds_no_attribute_to_a_states_metadata(self):
        # Each field is set by the constructor, so that a run only replaces values (see
        # StateMetadata's docstring): a field first set during a run gives each state a
        # dict of its own, hundreds of bytes more per state.
        calls = {"n": 0}

        async def flaky(context):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("once")
            return "last"

        agent = Agent("layout", isolation="inline")
        agent.add_state("first", flaky, max_retries=1, resources=ResourceRequirements(cpu_units=0.01, memory_mb=1.0))
        agent.add_state("last", _last)
        agent.add_state("never", _last)
        fields = {f.name for f in dataclasses.fields(StateMetadata)} | {"_number"}  # state_id's, private
        before = {name: set(vars(meta)) for name, meta in agent.state_metadata.items()}
        assert all(keys == fields for keys in before.values())
        await agent.run()
        assert agent.state_metadata["first"].total_attempts == 2  # a retry ran: error, waiting_for set
        assert {name: set(vars(meta)) for name, meta in agent.state_metadata.items()} == before


class TestANewRun:
    async def test_a_state_it_never_reaches_has_no_attempts_or_error_of_its_own(self):
        agent = Agent("rerun", isolation="inline")

        async def pick(context):
            return context.get_state("go", "breaks")

        async def breaks(context):
            raise RuntimeError("the first run's failure")

        async def fine(context):
            return None

        agent.add_state("pick", pick, next_states=["breaks", "fine"])
        agent.add_state("breaks", breaks)
        agent.add_state("fine", fine)
        with pytest.raises(StateFailedError):
            await agent.run()
        await agent.run(initial_context={"go": "fine"})
        meta = agent.state_metadata["breaks"]
        assert (meta.status, meta.attempts, meta.error, meta.runs) == (StateStatus.PENDING, 0, None, 0)
        assert meta.total_attempts == 1 and meta.history[-1].outcome == "failed"  # what earlier runs did


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


class TestABrokenRun:
    """Whatever raises out of a run (a store, a hook), the run ends FAILED and the agent is usable."""

    @pytest.mark.parametrize("fail_at", [1, 3])  # the save as the run starts; the save after "last"
    async def test_a_store_that_raises_fails_the_run_and_stops_its_states(self, fail_at):
        class BrokenStore:
            saves = 0

            def save(self, run_id, checkpoint, *, changed_keys=None):
                self.saves += 1
                if self.saves == fail_at:
                    raise RuntimeError("disk on fire")
                return self.saves

            def latest(self, run_id):
                return None

        gate, stopped = asyncio.Event(), asyncio.Event()

        async def start(context):
            return ["slow", "last"]

        async def slow(context):
            try:
                await gate.wait()
            finally:
                stopped.set()

        agent = Agent("broken", isolation="inline", checkpoint_store=BrokenStore())
        agent.add_state("start", start)
        agent.add_state("slow", slow)
        agent.add_state("last", _last)
        with pytest.raises(RuntimeError, match="disk on fire"):
            await agent.run()
        assert agent.status is AgentStatus.FAILED
        assert stopped.is_set() == (fail_at == 3)  # it ran, and was stopped
        assert agent.state_metadata["slow"].status is (StateStatus.CANCELLED if fail_at == 3 else StateStatus.PENDING)
        agent.checkpoint_store = None
        gate.set()
        await agent.run()
        assert agent.status is AgentStatus.COMPLETED

    def test_a_store_is_a_store_or_a_path(self, tmp_path):
        agent = Agent("stored", checkpoint_store=str(tmp_path / "runs.sqlite3"))
        assert isinstance(agent.checkpoint_store, SQLiteCheckpointStore)
        assert agent.checkpoint_store.path == str(tmp_path / "runs.sqlite3")
        with pytest.raises(InvalidConfigurationError, match="checkpoint_store must be a CheckpointStore"):
            Agent("stored", checkpoint_store=42)


class TestRunSync:
    """run_sync() is for scripts: where a loop runs already, it says to await run()."""

    def test_runs_on_a_loop_of_its_own(self):
        agent = Agent("sync", isolation="inline")
        agent.add_state("only", only_state)
        assert agent.run_sync(initial_context={"x": 1}).get_state("x") == 1
        assert agent.status is AgentStatus.COMPLETED

    def test_a_failure_is_raised_as_itself(self):
        # Not chained to the "no running event loop" that run_sync() checked for first:
        # a traceback shows the state's failure and nothing else.
        agent = Agent("sync_failing", isolation="inline")
        agent.add_state("boom", failing_state)
        with pytest.raises(StateFailedError, match="ValueError: boom") as caught:
            agent.run_sync()
        assert caught.value.__context__ is None

    def test_a_state_that_swallows_its_cancellation_does_not_keep_it_waiting(self, caplog):
        """asyncio.run() would wait forever for the abandoned state at its loop's teardown;
        run_sync() gives it cleanup_timeout more, then names it and leaves it."""
        agent = Agent("sync_stubborn", isolation="inline")
        agent.add_state("stubborn", swallows_every_cancellation)
        with pytest.raises(RunTimeoutError):
            agent.run_sync(timeout=0.05, cleanup_timeout=0.05)
        assert agent.state_metadata["stubborn"].status is StateStatus.CANCELLED
        abandoned = [r.getMessage() for r in caplog.records if "abandoned with the event loop" in r.getMessage()]
        assert len(abandoned) == 1 and "state 'stubborn'" in abandoned[0]

    async def test_inside_a_running_loop_it_is_refused_and_nothing_runs(self, recwarn):
        agent = Agent("notebook", isolation="inline")
        agent.add_state("only", only_state)
        with pytest.raises(EventLoopRunningError, match="await agent.run"):
            agent.run_sync()
        assert agent.status is AgentStatus.IDLE
        assert not [w for w in recwarn if "never awaited" in str(w.message)]
        assert (await agent.run()) is agent.context  # the way it says works


async def only_state(context):
    return None


async def swallows_every_cancellation(context):
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass


async def failing_state(context):
    raise ValueError("boom")
