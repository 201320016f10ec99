"""An attempt's outcome as soon as its result is in; the rest of its end settles after.

The engine hands each attempt a set (``Attempt.settle``) where a ``process`` or
``sandbox`` attempt leaves its end (the process exiting, its log closed, its cgroup and
uid let go), and a run returns only once every such end is over.
"""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

from agent import Agent
from agent.context import Context
from agent.executor import read_attempt_log
from agent.supervisor.child import ChildProcess

from .helpers import make_attempt, run, state_process_gone


async def printing_pid(context: Context) -> int:
    print("last words", flush=False)  # flushed by the process's exit, after its result
    return os.getpid()


async def printing_pid_then_held(context: Context) -> int:
    """:func:`printing_pid`, whose process exits only once the test opens the ``gate`` FIFO."""
    import os

    gate, leave = context.get_state("gate"), os._exit

    def held(code: int) -> None:
        with open(gate) as fifo:
            fifo.read()
        leave(code)

    os._exit = held  # type: ignore[assignment]
    print("last words", flush=False)  # flushed by the process's exit, after its result
    return os.getpid()


async def lingering(context: Context) -> None:
    """Reports its result, then stays: the process's exit never comes by itself."""
    import time

    context.set_state("pid", os.getpid())
    os._exit = lambda code: time.sleep(3600)  # type: ignore[assignment]


async def test_the_outcome_comes_with_the_result_and_the_end_settles_after(tmp_path) -> None:
    # Its process exits only once the outcome is in (else, on a busy machine, its exit
    # could be heard first: then the attempt's end is awaited, not left to a task).
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    attempt = make_attempt(printing_pid_then_held, context=Context({"gate": str(gate)}))
    attempt.settle = set()
    outcome = await run(attempt)
    ends = set(attempt.settle)
    assert len(ends) == 1  # its end was left to a task
    assert outcome.usage["cpu_seconds"] > 0 and attempt.usage == outcome.usage
    # Let it exit (it waits for a writer; off the loop, which serves it meanwhile).
    await asyncio.get_running_loop().run_in_executor(None, lambda: open(gate, "w").close())
    await asyncio.wait(ends)
    assert not attempt.settle  # a finished end leaves the set
    assert state_process_gone(outcome.result)
    assert "last words" in read_attempt_log(attempt.run_id, attempt.state_name, attempt.number)


async def test_an_attempt_holding_gpus_is_over_only_when_its_process_is() -> None:
    """A process that is still exiting holds its GPU memory: the next state must not get the GPU yet."""
    attempt = make_attempt(printing_pid)
    attempt.settle = set()
    attempt.assignment = {"gpus": ["GPU-00000000-0000-0000-0000-000000000000"]}
    outcome = await run(attempt)
    assert state_process_gone(outcome.result)  # gone before the outcome came
    if attempt.settle:  # what is left for the run to await: the removal of its cgroup, no process
        await asyncio.wait(attempt.settle)


async def test_a_run_returns_only_once_every_state_process_is_gone() -> None:
    agent = Agent("settled", isolation="process")
    for name, following in (("a", "b"), ("b", "c"), ("c", None)):
        async def step(context: Context, name: str = name, following: str | None = following) -> str | None:
            print(f"{name} done")
            context.set_state(f"pid_{name}", os.getpid())
            return following

        agent.add_state(name, step, next_states=[following] if following else [])
    ctx = await agent.run()
    for name in "abc":
        assert state_process_gone(ctx.get_state(f"pid_{name}"))
        assert f"{name} done" in read_attempt_log(agent.run_id, name, 1)


async def test_a_process_that_stays_after_its_result_is_killed_and_awaited(monkeypatch: pytest.MonkeyPatch) -> None:
    kills = []
    original = ChildProcess.kill
    monkeypatch.setattr(ChildProcess, "kill", lambda child: (kills.append(child.pid), original(child)))
    agent = Agent("lingers", isolation="process")
    agent.add_state("linger", lingering)
    ctx = await agent.run()
    pid = ctx.get_state("pid")
    assert agent.state_metadata["linger"].status.value == "completed"
    assert kills == [pid]  # after the stop grace
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_cancelled_run_still_waits_for_the_end_of_its_finished_attempts() -> None:
    reached = asyncio.Event()

    async def hang(context: Context) -> None:
        reached.set()
        await asyncio.Event().wait()

    async def note_pid(context: Context) -> str:
        context.set_state("pid", os.getpid())
        return "hang"

    agent = Agent("cancelled", isolation="process")
    agent.add_state("isolated", note_pid, next_states=["hang"])
    agent.add_state("hang", hang, isolation="inline")
    task = asyncio.ensure_future(agent.run())
    await reached.wait()  # the isolated state's outcome is in; its process may still be exiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state_process_gone(agent.context.get_state("pid"))
