"""Agents with ``isolation="process"`` and ``"worker"``: the spec's workflows, failures and cancellation."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import gc
import os
import sys
import time
import weakref

import psutil
import pytest

from agent import Agent, AgentStatus, Context, StateStatus
from agent.clock import settle
from agent.coordination import PrimitiveType, create_coordinated_agent
from agent.errors import (
    AgentBusyError, AttemptLogNotFoundError, InvalidTransitionError, IsolationError, RunTimeoutError, StateFailedError,
    StateTimeoutError,
)
from agent.executor import Isolation
from agent.human import QueueInputProvider

from agent.supervisor import current_supervisor, shutdown_supervisor

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


VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


async def times_out_inside(context):
    try:
        async with asyncio.timeout(0.05):  # cancels the task it was entered in
            await asyncio.Event().wait()
    except TimeoutError:
        context.set_state("timed_out", True)
    return "keeps_its_task"


async def keeps_its_task(context):
    task = asyncio.current_task()
    VAR.set(context.state_name)
    await asyncio.sleep(0)
    context.set_state("same_task", task is not None and asyncio.current_task() is task)
    return "sees_no_var"


async def sets_var_without_awaiting(context):
    VAR.set(context.state_name)  # a state that cannot suspend is run at once, inline
    return "sees_no_var"


async def sees_no_var(context):
    context.set_state("inherited", VAR.get())


async def awaits_a_task_it_cancelled(context):
    inner = asyncio.ensure_future(asyncio.sleep(3600))
    await asyncio.sleep(0)
    inner.cancel()
    await inner  # its CancelledError leaves the state: the state was not stopped


async def crashing(context):
    raise RuntimeError("disk full")


async def sleeper(context):
    context.set_state("pid", os.getpid())
    await asyncio.sleep(3600)


async def ignores_cancellation(context):
    """Swallows every cancellation, writing to the context on and on."""
    context.set_state("pid", os.getpid())
    for tick in range(2000):
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass
        context.set_state("tick", tick)


async def blocks_in_c(context):
    """Blocks where no cancellation reaches it: stopped only by the kill after the stop grace."""
    context.set_state("pid", os.getpid())
    time.sleep(30)


async def begin_two(context):
    return ["blocks_in_c", "record_pid"]


async def record_pid(context):
    context.set_state(f"pid_{context.state_name}", os.getpid())


async def step_none(context):
    return None


async def forks_a_copy(context):
    """Forks a copy of its process, which runs the state on to its end, as a fork bomb's do."""
    pid = os.fork()
    if pid == 0:
        try:
            context.set_state("from_copy", True)
        except IsolationError:
            return "nowhere"  # its outcome is not the attempt's: it exits quietly
        os._exit(3)  # its write went out on the state's connection
    _, status = os.waitpid(pid, 0)
    context.set_state("copy_exit", os.waitstatus_to_exitcode(status))
    return None


async def forks_a_helper_that_exits(context):
    pid = os.fork()
    if pid == 0:
        sys.exit(5)  # ends as a program's sys.exit would
    _, status = os.waitpid(pid, 0)
    context.set_state("helper_exit", os.waitstatus_to_exitcode(status))


async def asks_for_a_score(context):
    score = await context.human_in_the_loop(
        prompt="Enter score (0-100):", timeout=60, validator=lambda x: x.isdigit() and 0 <= int(x) <= 100,
    )
    context.set_state("score", int(score))


async def ends_in_its_cgroup(context):
    """Records its memory cgroup, then returns, raises, or passes its memory limit."""
    with open("/proc/self/cgroup") as fh:
        path = next(line.strip().split(":", 2)[2] for line in fh if "memory" in line.split(":")[1].split(","))
    context.set_state("cgroup", f"/sys/fs/cgroup/memory{path}")
    ending = context.get_state("ending")
    if ending == "raises":
        raise RuntimeError("as asked")
    if ending == "memory_limit":
        block = bytearray(200 << 20)
        block[::4096] = b"x" * len(block[::4096])


async def burns(context):
    context.set_state("burning", True)
    while True:
        pass


async def reads_the_environment(context):
    context.set_state("seen", [os.environ.get(name) for name in ("AGENT_TEST_SET", "AGENT_TEST_GONE", "TZ")])


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


NO_NAME = {
    "int": r"'returns_no_name' returned int 42: return the next state's name",
    "object": r"'returns_no_name' returned Opaque <opaque>: return the next state's name",
    "int_keys": r"'returns_no_name' returned dict \{1: 'a'\}: return the next state's name",
    "list_with_object": r"'returns_no_name' returned a list containing Opaque <opaque>: a list may hold only",
}


async def returns_no_name(context):
    return {"int": 42, "object": Opaque(), "int_keys": {1: "a"},
            "list_with_object": ["returns_no_name", Opaque()]}[context.get_state("kind")]


class TestAgentWithProcessIsolation:
    """The scheduler's states run in children (or workers) and their writes reach the run's context."""

    async def test_a_state_sees_the_programs_environment_as_it_is_now(self, level, monkeypatch):
        # The supervisor (its zygote, its workers) outlives a run; what the program set or
        # removed since reaches the next state, as it does an inline one.
        async def seen() -> list:
            agent = Agent("environ", isolation=level)
            agent.add_state("reads", reads_the_environment)
            return (await agent.run()).get_state("seen")

        monkeypatch.setenv("AGENT_TEST_GONE", "before")
        monkeypatch.setenv("AGENT_TEST_SET", "one")
        monkeypatch.setenv("TZ", "UTC")
        assert (await seen()) == ["one", "before", "UTC"]
        monkeypatch.setenv("AGENT_TEST_SET", "two")
        monkeypatch.delenv("AGENT_TEST_GONE")
        monkeypatch.setenv("TZ", "Europe/Paris")
        assert (await seen()) == ["two", None, "Europe/Paris"]

    async def test_a_sandbox_gets_only_the_variables_it_keeps_as_they_are_now(self, monkeypatch):
        monkeypatch.setenv("TZ", "UTC")
        agent = Agent("environ", isolation="sandbox")
        agent.add_state("reads", reads_the_environment, context_keys=["seen"])
        await agent.run()
        monkeypatch.setenv("TZ", "Europe/Paris")
        monkeypatch.setenv("AGENT_TEST_SET", "secret")
        agent = Agent("environ", isolation="sandbox")
        agent.add_state("reads", reads_the_environment, context_keys=["seen"])
        assert (await agent.run()).get_state("seen") == [None, None, "Europe/Paris"]

    async def test_a_timed_out_attempt_keeps_what_it_used(self, level):
        agent = Agent("burner", isolation=level)
        agent.add_state("burns", burns, timeout=0.5)
        with pytest.raises(StateTimeoutError):
            await agent.run()
        meta = agent.state_metadata["burns"]
        assert meta.usage.get("cpu_seconds", 0) > 0
        assert meta.history[-1].usage == meta.usage

    @pytest.mark.parametrize("ending", ["returns", "raises", "memory_limit"])
    async def test_a_run_returns_only_once_its_attempts_cgroups_are_gone(self, level, ending, monkeypatch):
        # Removing a cgroup is left to the confiner's thread, which the kernel may keep
        # waiting (made slower here): run() returns only once it is done.
        if not os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes"):
            pytest.skip("reads cgroup v1 paths")
        if level is Isolation.WORKER and ending != "memory_limit":
            pytest.skip("a worker that served its state keeps its cgroup")
        from agent import ResourceRequirements
        from agent.supervisor import current_supervisor

        agent = Agent("cgroup_gone", isolation=level)
        agent.add_state("s", ends_in_its_cgroup, resources=ResourceRequirements(memory_mb=64))
        warm = Agent("warm", isolation=level)
        warm.add_state("s", ends_in_its_cgroup)
        await warm.run()  # the supervisor is up
        confiner = current_supervisor().confiner
        real = confiner.background

        def slowly(work):
            def later():
                time.sleep(0.3)
                work()
            return real(later)

        monkeypatch.setattr(confiner, "background", slowly)
        try:
            await agent.run(initial_context={"ending": ending})
        except StateFailedError:
            assert ending != "returns"
        assert not os.path.exists(agent.context.get_state("cgroup"))

    async def test_quickstart(self, level):
        agent = Agent("hello_workflow", isolation=level)
        agent.add_state("process_data", process_data)
        agent.add_state("format_output", format_output)
        ctx = await agent.run()
        assert agent.status is AgentStatus.COMPLETED
        assert ctx.get_state("formatted") == "<<Hello, World!>>"
        assert ctx.get_state("pid") != os.getpid()
        assert "Result: Hello, World!" in agent.logs("format_output")

    async def test_a_dropped_agent_whose_run_brought_the_supervisor_to_this_loop_is_freed(self, level):
        # The supervisor's readers (and a worker's channel) are made inside the first
        # attempt on a loop: they must not keep that attempt's run, and its agent, alive.
        # A coordinated agent's attempts carry a variable that leads back to its run.
        agent = create_coordinated_agent("dropped", isolation=level)
        agent.add_state_coordination("process_data", PrimitiveType.SEMAPHORE, max_count=2)
        agent.add_state("process_data", process_data)
        agent.add_state("format_output", format_output)
        await agent.run()
        gone = weakref.ref(agent)
        del agent
        await settle()
        gc.collect()
        assert gone() is None
        # Its declaration went with it: another agent may declare other settings.
        again = create_coordinated_agent("again", isolation=level)
        again.add_state_coordination("process_data", PrimitiveType.SEMAPHORE, max_count=3)

    async def test_a_cold_supervisor_is_ready_before_the_first_state_starts(self, level):
        # Its zygote's start (a few tenths of a second) is then neither in the first
        # state's duration nor in its timeout.
        shutdown_supervisor()
        ready_at_start = []
        agent = Agent("cold", isolation=level)
        agent.add_state("process_data", process_data, timeout=30)
        agent.add_state("format_output", format_output)
        agent.add_observer(lambda e: ready_at_start.append(current_supervisor().ready)
                           if e.kind == "state_started" else None)
        await agent.run()
        assert ready_at_start == [True, True]

    async def test_cancel_all_while_a_cold_supervisor_starts_cancels_the_run(self, level):
        shutdown_supervisor()
        agent = Agent("cancelled_early", isolation=level)
        agent.add_state("process_data", process_data)
        seen: list[tuple[str, str | None, str | None]] = []
        agent.add_observer(lambda e: seen.append((e.kind, e.state, e.status)))
        run = asyncio.ensure_future(agent.run())
        await asyncio.sleep(0)  # run() has begun: it waits for the supervisor's zygote
        with pytest.raises(AgentBusyError):
            await agent.run()  # a second one meanwhile
        await agent.cancel_all()
        await run
        assert agent.status is AgentStatus.CANCELLED and not agent.context.has_state("pid")
        # As a run cancelled once begun: its first state CANCELLED, and the events say so.
        assert agent.state_metadata["process_data"].status is StateStatus.CANCELLED
        assert seen == [("run_started", None, None), ("state_cancelled", "process_data", None),
                        ("run_finished", None, "cancelled")]

    async def test_a_run_is_running_and_steerable_while_a_cold_supervisor_starts(self, level):
        shutdown_supervisor()
        agent = Agent("steered_early", isolation=level)
        agent.add_state("process_data", process_data)
        agent.add_state("format_output", format_output)
        run = asyncio.ensure_future(agent.run())
        await asyncio.sleep(0)  # run() has begun: it waits for the supervisor's zygote
        assert agent.status is AgentStatus.RUNNING
        await agent.pause()
        assert agent.status is AgentStatus.PAUSED
        await agent.resume()
        assert (await run).get_state("formatted") == "<<Hello, World!>>"
        assert agent.status is AgentStatus.COMPLETED

    async def test_cancel_state_while_a_cold_supervisor_starts_cancels_that_state(self, level):
        shutdown_supervisor()
        agent = Agent("cancelled_state_early", isolation=level)
        agent.add_state("sleeper", sleeper)
        agent.add_state("process_data", process_data)
        run = asyncio.ensure_future(agent.run())
        await asyncio.sleep(0)
        assert agent.cancel_state("sleeper")
        assert not agent.cancel_state("process_data")  # nothing of it is due: not cancelled ahead
        await run
        assert agent.state_metadata["sleeper"].status is StateStatus.CANCELLED
        assert not agent.context.has_state("pid")  # it never started

    async def test_a_state_cancelled_before_its_timeout_is_cancelled_when_the_timeout_passes_in_its_stop(
        self, level, monkeypatch,
    ):
        """Its timer fired while it was being stopped: it was TIMEOUT then, and the run that
        cancel_state() meant to go on failed with StateTimeoutError."""
        import dataclasses

        prime = Agent("prime", isolation=level)
        prime.add_state("record_pid", record_pid)
        await prime.run()  # the supervisor is up: its grace can be lengthened past the timeout
        sup = current_supervisor()
        monkeypatch.setattr(sup, "config", dataclasses.replace(sup.config, grace=3.0))
        agent = Agent("cancel_then_timeout", isolation=level)
        agent.add_state("begin", begin_two)
        agent.add_state("blocks_in_c", blocks_in_c, timeout=1.0)
        agent.add_state("record_pid", record_pid)
        run = asyncio.ensure_future(agent.run())
        while not agent.context.has_state("pid"):
            await asyncio.sleep(0.01)
        assert agent.cancel_state("blocks_in_c")  # the kill comes 3 s on: past the timeout
        context = await run
        assert agent.status is AgentStatus.COMPLETED and context.has_state("pid_record_pid")
        assert agent.state_metadata["blocks_in_c"].status is StateStatus.CANCELLED
        assert state_process_gone(context.get_state("pid"))

    async def test_a_state_that_returns_while_being_paused_completed_and_is_not_run_again(
        self, level, monkeypatch, tmp_path,
    ):
        """It blocked until it was done, and its result came in within the stop grace: before,
        that result was thrown away and the state ran again on resume (its side effects twice)."""
        import dataclasses

        prime = Agent("prime", isolation=level)
        prime.add_state("record_pid", record_pid)
        await prime.run()  # the supervisor is up: its grace can be lengthened past the block
        sup = current_supervisor()
        monkeypatch.setattr(sup, "config", dataclasses.replace(sup.config, grace=30.0))
        starts = str(tmp_path / "starts")

        async def blocks_then_returns(context):
            import time as child_time

            with open(starts, "a") as log:
                log.write("start\n")
            context.set_state("pid", os.getpid())
            child_time.sleep(0.5)  # no pause reaches it meanwhile
            return "record_pid"

        agent = Agent("paused_as_it_returns", isolation=level)
        agent.add_state("blocks_then_returns", blocks_then_returns)
        agent.add_state("record_pid", record_pid)
        run = asyncio.ensure_future(agent.run())
        while not agent.context.has_state("pid"):
            await asyncio.sleep(0.01)
        await agent.pause()
        assert [h.outcome for h in agent.state_metadata["blocks_then_returns"].history] == ["completed"]
        await agent.resume()
        context = await run
        assert agent.status is AgentStatus.COMPLETED and context.has_state("pid_record_pid")
        with open(starts) as log:
            assert log.read() == "start\n"

    async def test_a_second_cancel_during_the_cleanup_still_waits_for_the_state_process(self, level):
        """An outer timeout or a shutdown cancels again: run() still ends only once the state's
        process is gone (before, it returned with the process alive and the state RUNNING)."""
        agent = Agent("cancelled_twice", isolation=level)
        agent.add_state("blocks_in_c", blocks_in_c)
        run = asyncio.ensure_future(agent.run())
        while not agent.context.has_state("pid"):
            await asyncio.sleep(0.01)
        run.cancel()
        await settle()  # run() took the first cancel: it is stopping the state, which ignores it
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert agent.state_metadata["blocks_in_c"].status is StateStatus.CANCELLED
        assert state_process_gone(agent.context.get_state("pid"))

    async def test_a_run_cancelled_while_a_cold_supervisor_starts_leaves_the_agent_free(self, level):
        shutdown_supervisor()
        agent = Agent("caller_gone", isolation=level)
        agent.add_state("process_data", process_data)
        agent.add_state("format_output", format_output)
        run = asyncio.ensure_future(agent.run())
        await asyncio.sleep(0)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert (await agent.run()).get_state("greeting") == "Hello, World!"

    async def test_a_run_whose_states_use_an_agent_starts_no_supervisor(self, level):
        # Such states run inline (they work on the live agent), so nothing waits for one.
        shutdown_supervisor()
        agent = Agent("uses_itself", isolation=level)

        async def step(context):
            agent.context.set_state("seen", agent.name)

        agent.add_state("step", step)
        assert (await agent.run()).get_state("seen") == "uses_itself"
        assert current_supervisor() is None

    async def test_the_log_of_a_state_that_has_not_run_is_a_typed_error_saying_so(self, level):
        agent = Agent("unrun", isolation=level)
        agent.add_state("process_data", process_data)
        agent.add_state("format_output", format_output)
        agent.add_state("never", format_output)
        with pytest.raises(AttemptLogNotFoundError, match="'process_data' of agent 'unrun' has not run yet: "):
            agent.logs("process_data")
        await agent.run()
        with pytest.raises(AttemptLogNotFoundError, match="'never' of agent 'unrun' has not run yet in this run"):
            agent.logs("never")

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

    @pytest.mark.parametrize("where", ["inline", "isolated"])
    @pytest.mark.parametrize("kind", ["int", "object", "int_keys", "list_with_object"])
    async def test_a_return_that_is_no_transition_is_refused_alike(self, level, where, kind):
        # Also a value that cannot cross to the supervisor: refused for what it is, not
        # reported as an unencodable value (and not retried).
        agent = Agent("no_transition", isolation="inline" if where == "inline" else level)
        agent.add_state("returns_no_name", returns_no_name, max_retries=2)
        with pytest.raises(InvalidTransitionError, match=NO_NAME[kind]):
            await agent.run(initial_context={"kind": kind})
        assert agent.state_metadata["returns_no_name"].attempts == 1

    @pytest.mark.parametrize("where", ["inline", "isolated"])
    async def test_a_state_is_a_task_of_its_own_from_first_line_to_last(self, level, where):
        # asyncio.timeout(), aiohttp's and anyio's timeouts (httpx, LLM clients) cancel the
        # task they were entered in; context variables a state sets stay in its task.
        agent = Agent("own_task", isolation="inline" if where == "inline" else level)
        for state in (times_out_inside, keeps_its_task, sees_no_var):
            agent.add_state(state.__name__, state)
        ctx = await agent.run()
        assert agent.status is AgentStatus.COMPLETED
        assert ctx.get_state("timed_out") is True
        assert ctx.get_state("same_task") is True
        assert ctx.get_state("inherited") == "unset" and VAR.get() == "unset"
        # A state that awaits nothing sets its variables in its own copy too.
        agent = Agent("at_once", isolation="inline" if where == "inline" else level)
        agent.add_state("sets_var_without_awaiting", sets_var_without_awaiting)
        agent.add_state("sees_no_var", sees_no_var)
        assert (await agent.run()).get_state("inherited") == "unset" and VAR.get() == "unset"

    @pytest.mark.parametrize("where", ["inline", "isolated"])
    async def test_a_cancelled_error_of_its_own_is_a_failure_not_a_return(self, level, where):
        agent = Agent("own_cancel", isolation="inline" if where == "inline" else level)
        agent.add_state("s", awaits_a_task_it_cancelled, max_retries=1)
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        assert (info.value.reason.kind, info.value.attempts) == ("exception", 2)  # retried like an exception
        assert "without being stopped" in info.value.reason.message
        assert agent.state_metadata["s"].status is StateStatus.FAILED

    @pytest.mark.parametrize("where", ["inline", "isolated"])
    async def test_a_rejected_answer_is_asked_again_as_the_same_question(self, level, where):
        # The child validates; the human sees one question asked again, with why, as inline.
        provider = QueueInputProvider()
        agent = Agent("review", isolation="inline" if where == "inline" else level, human_input=provider)
        agent.add_state("asks_for_a_score", asks_for_a_score)
        run = asyncio.ensure_future(agent.run())
        first = await provider.wait_for_request()
        assert (first.attempt, first.rejected, first.state) == (1, None, "asks_for_a_score")
        provider.answer(first.id, "150")
        again = await provider.wait_for_request()
        assert (again.id, again.attempt, again.rejected) == (first.id, 2, "'150' is not valid")
        assert provider.pending() == [again]
        provider.answer(again.id, "87")
        assert (await run).get_state("score") == 87

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


    @pytest.mark.parametrize("swallows", [False, True], ids=["reraises", "swallows"])
    async def test_a_run_ending_early_does_not_wait_past_cleanup_timeout_for_a_hook_holding_up_its_state(
        self, level, swallows,
    ):
        """Only a state's process is killed and waited for; an admission hook that takes long
        to give up (the program's own code, no process yet) is left, as at ``inline``; and
        the state it held up never starts, even if the hook swallowed its cancellation."""
        release, released = asyncio.Event(), asyncio.Event()

        class SlowLease:
            async def acquire(self, state, run_id, attempt):
                try:
                    await asyncio.Event().wait()  # a lease that never comes
                except asyncio.CancelledError:
                    await asyncio.shield(release.wait())  # gives back what it half got first
                    if not swallows:
                        raise

            async def release(self, state, run_id, attempt, ok):
                released.set()

        agent = Agent("hooked", isolation=level)
        agent.add_admission_hook(SlowLease())
        agent.add_state("work", record_pid)
        with pytest.raises(RunTimeoutError):
            await agent.run(timeout=0.2, cleanup_timeout=0.05)
        assert not released.is_set()  # the run returned without waiting for the hook
        release.set()
        if swallows:
            await released.wait()  # its attempt is over
        assert agent.context.get_state("pid_work") is None  # the state never started

    async def test_a_process_the_state_forked_neither_writes_nor_reports_on_its_connection(self, level):
        agent = Agent("forks", isolation=level)
        agent.add_state("forks", forks_a_copy)
        context = await agent.run()
        assert context.get_state("copy_exit") == 0 and context.get_state("from_copy") is None
        assert agent.state_metadata["forks"].status is StateStatus.COMPLETED
        helper = Agent("helper", isolation=level)
        helper.add_state("helper", forks_a_helper_that_exits)
        assert (await helper.run()).get_state("helper_exit") == 5

    @pytest.mark.parametrize("ending", ["cancel_all", "timeout"])
    async def test_a_state_ignoring_its_cancellation_is_killed_when_the_cleanup_timeout_is_over(
        self, level, ending,
    ):
        """The run ends early; its state swallows the cancellation. Once ``cleanup_timeout``
        is over (well before the stop grace, 0.5 s here) its process is killed, and the run
        returns only once it is gone: nothing of it runs, or writes to the context, after."""
        agent = Agent("stubborn", isolation=level)
        agent.add_state("stubborn", ignores_cancellation)
        seen = []
        agent.add_observer(seen.append)
        started = asyncio.Event()
        agent.context = Context(on_write=lambda key, value, deleted: key == "pid" and started.set())
        if ending == "timeout":
            with pytest.raises(RunTimeoutError):
                await agent.run(timeout=3, cleanup_timeout=0.05)  # room for a cold zygote
        else:
            run = asyncio.ensure_future(agent.run(cleanup_timeout=0.05))
            await started.wait()
            await agent.cancel_all()
            await run
        pid = agent.context.get_state("pid")
        try:
            gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            gone = True
        assert gone  # a worker too: one that did not stop is not kept
        assert agent.state_metadata["stubborn"].status is StateStatus.CANCELLED
        assert [e.state for e in seen if e.kind == "state_cancelled"] == ["stubborn"]

    async def test_a_stop_begun_by_the_states_own_timeout_ends_with_the_runs_cleanup_timeout(
        self, level, monkeypatch,
    ):
        """The state's timeout stops it with the supervisor's grace (an hour here); the run's
        timeout comes meanwhile: its ``cleanup_timeout`` cuts that stop short too (it was let
        run its whole grace: the run waited for the state to end by itself)."""
        import dataclasses

        prime = Agent("prime", isolation=level)
        prime.add_state("record_pid", record_pid)
        await prime.run()  # the supervisor is up: its grace can be lengthened
        sup = current_supervisor()
        monkeypatch.setattr(sup, "config", dataclasses.replace(sup.config, grace=3600.0))
        agent = Agent("stubborn_timeout", isolation=level)
        agent.add_state("stubborn", ignores_cancellation, timeout=0.5)
        with pytest.raises(RunTimeoutError):
            await agent.run(timeout=2, cleanup_timeout=0.05)
        assert agent.context.get_state("tick") < 1999  # killed, not let run to its end
        pid = agent.context.get_state("pid")
        try:
            gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            gone = True
        assert gone


class TestStatesThatUseAnAgent:
    """A state whose code calls an agent (the spec's coordination status and clean-up
    states) works on that live object: at the agent's own process or worker level it runs
    inline; a level chosen for the state itself is kept, and says why it cannot be."""

    async def test_they_run_where_the_agent_lives(self, level):
        from agent.coordination import Coordinator, PrimitiveType, create_coordinated_agent

        coordinator = Coordinator(detection_interval=3600)
        agent = create_coordinated_agent("monitored", coordinator=coordinator, isolation=level)
        agent.add_state_coordination("database_write", PrimitiveType.MUTEX, ttl=30.0)
        seen = {}

        async def monitor_coordination(context):
            status = await agent.get_coordination_status()
            seen["primitives"] = sorted(status["primitives"])
            seen["monitor_pid"] = os.getpid()
            return "cleanup_resources"

        async def cleanup_resources(context):
            await agent.reset_coordination()
            seen["cleanup_pid"] = os.getpid()
            return "isolated"

        async def isolated(context):  # uses no agent: it keeps the agent's level
            context.set_state("pid", os.getpid())

        for name, func in (("monitor_coordination", monitor_coordination),
                           ("cleanup_resources", cleanup_resources), ("isolated", isolated)):
            agent.add_state(name, func)
        context = await agent.run()
        assert seen == {"primitives": ["database_write"], "monitor_pid": os.getpid(), "cleanup_pid": os.getpid()}
        assert context.get_state("pid") != os.getpid()
        await coordinator.aclose()

    async def test_a_level_chosen_for_the_state_is_kept(self):
        agent = Agent("chosen", isolation="inline")

        async def status(context):
            return agent.name

        agent.add_state("status", status, isolation="process", max_retries=3)
        with pytest.raises(StateFailedError, match=r"it uses 'agent' \(of type Agent\).*isolation='inline'") as info:
            await agent.run()
        assert info.value.attempts == 1 and info.value.reason.permanent  # it would fail the same way again
        assert info.value.reason.exception_type == "agent.errors.UnsendableStateError"
