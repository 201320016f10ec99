"""Execution control: run timeout, pause/resume, cancel_state, cancel_all, checkpoints."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agent import (
    Agent,
    AgentBusyError,
    AgentCheckpoint,
    AgentStatus,
    CheckpointError,
    DependencyConfig,
    RunTimeoutError,
    StateStatus,
)
from agent import events as ev


def blocking(started: asyncio.Event, log: list, gate: asyncio.Event | None = None):
    async def state(context):
        log.append(("start", context.state_name))
        started.set()
        await (gate or asyncio.Event()).wait()
        log.append(("end", context.state_name))

    return state


async def run_until_blocked(agent_name: str, state: str) -> tuple[Agent, asyncio.Future, list]:
    """An inline agent of one ``blocking`` state, its run started and that state running."""
    started = asyncio.Event()
    log: list = []
    agent = Agent(agent_name, isolation="inline")
    agent.add_state(state, blocking(started, log))
    run = asyncio.ensure_future(agent.run())
    await started.wait()
    return agent, run, log


def _logging_agent(name: str) -> tuple[Agent, list[str]]:
    """An inline agent of one state, ``first``, that logs each time it runs."""
    log: list[str] = []
    agent = Agent(name, isolation="inline")

    async def first(context):
        log.append("first")

    agent.add_state("first", first)
    return agent, log


class TestRunTimeout:
    """run(timeout=...) cancels what runs and raises RunTimeoutError."""

    async def test_timeout(self):
        cancelled = asyncio.Event()
        agent = Agent("slow", isolation="inline")

        async def hang(context):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        agent.add_state("hang", hang)
        expired = r"did not finish within its timeout of 0\.05 s; still running: \['hang'\]"
        with pytest.raises(RunTimeoutError, match=expired):
            await agent.run(timeout=0.05, cleanup_timeout=1)
        assert cancelled.is_set()
        assert agent.status is AgentStatus.FAILED
        assert agent._running_states == {}

    async def test_a_state_ignoring_its_cancellation_is_told_cancelled(self):
        """An inline state that swallows its cancellation cannot be stopped; once the run's
        ``cleanup_timeout`` is over it is CANCELLED all the same, and observers are told so."""
        release, over = asyncio.Event(), asyncio.Event()
        agent = Agent("stubborn", isolation="inline")

        async def stubborn(context):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass  # ignored
            try:
                await release.wait()
            finally:
                over.set()

        agent.add_state("stubborn", stubborn)
        seen = []
        agent.add_observer(seen.append)
        with pytest.raises(RunTimeoutError):
            await agent.run(timeout=0.05, cleanup_timeout=0.05)
        release.set()
        await over.wait()
        assert agent.state_metadata["stubborn"].status is StateStatus.CANCELLED
        assert [e.state for e in seen if e.kind == "state_cancelled"] == ["stubborn"]

    async def test_a_run_kept_past_its_timeout_by_a_blocking_state_times_out(self):
        agent = Agent("blocked_loop", isolation="inline")

        async def blocks(context):
            await asyncio.sleep(0)
            time.sleep(0.2)  # the run's timer cannot fire meanwhile

        agent.add_state("blocks", blocks)
        with pytest.raises(RunTimeoutError, match="blocked the event loop"):
            await agent.run(timeout=0.05)
        assert agent.status is AgentStatus.FAILED

    async def test_timeout_is_a_timeout_error(self):
        assert issubclass(RunTimeoutError, TimeoutError)

    async def test_caller_cancellation_cleans_up(self):
        agent, task, _ = await run_until_blocked("c", "s")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert agent.status is AgentStatus.CANCELLED
        assert agent.state_metadata["s"].status is StateStatus.CANCELLED

    async def test_busy(self):
        started = asyncio.Event()
        agent = Agent("busy", isolation="inline")
        agent.add_state("s", blocking(started, []))
        task = asyncio.create_task(agent.run())
        await started.wait()
        with pytest.raises(AgentBusyError):
            await agent.run()
        await agent.cancel_all()
        await task


class TestCancel:
    """cancel_state ends one branch; cancel_all ends the run."""

    async def test_cancel_state_running(self):
        started = asyncio.Event()
        log: list = []
        agent = Agent("cancel", isolation="inline")

        async def start(context):
            return ["victim", "survivor"]

        async def survivor(context):
            await started.wait()
            assert agent.cancel_state("victim") is True
            log.append("survivor")

        agent.add_state("start", start)
        agent.add_state("victim", blocking(started, log))
        agent.add_state("survivor", survivor)
        await agent.run()
        assert agent.status is AgentStatus.COMPLETED
        assert agent.state_metadata["victim"].status is StateStatus.CANCELLED
        assert "survivor" in log and ("end", "victim") not in log

    async def test_a_state_task_cancelled_from_outside_the_engine_is_cancelled(self):
        # Not through cancel_state: some code of the application cancels the task it runs in.
        tasks: list[asyncio.Task] = []
        started = asyncio.Event()
        agent = Agent("outside", isolation="inline")

        async def start(context):
            return ["victim", "survivor"]

        async def victim(context):
            tasks.append(asyncio.current_task())
            started.set()
            await asyncio.Event().wait()

        async def survivor(context):
            await started.wait()
            tasks[0].cancel()

        agent.add_state("start", start)
        agent.add_state("victim", victim)
        agent.add_state("survivor", survivor)
        await agent.run()
        assert agent.status is AgentStatus.COMPLETED
        assert agent.state_metadata["victim"].status is StateStatus.CANCELLED  # not COMPLETED
        assert agent.state_metadata["victim"].runs == 0

    async def test_cancel_state_from_another_thread(self):
        # As a web request's thread would: the cancel is done on the run's loop (in debug
        # mode, the loop refuses a call from another thread).
        asyncio.get_running_loop().set_debug(True)
        agent, run, log = await run_until_blocked("threads", "victim")
        answer = await asyncio.to_thread(agent.cancel_state, "victim")
        await run
        assert answer is True
        assert agent.state_metadata["victim"].status is StateStatus.CANCELLED
        assert ("end", "victim") not in log

    async def test_cancel_state_queued(self):
        log: list = []
        started = asyncio.Event()
        agent = Agent("cancelq", isolation="inline", max_concurrent=1)

        async def start(context):
            return ["first", "second"]

        agent.add_state("start", start)
        gate = asyncio.Event()
        agent.add_state("first", blocking(started, log, gate))
        agent.add_state("second", blocking(asyncio.Event(), log))
        task = asyncio.create_task(agent.run())
        await started.wait()
        assert agent.cancel_state("second") is True
        gate.set()
        await task
        assert agent.state_metadata["second"].status is StateStatus.CANCELLED
        assert ("start", "second") not in log

    async def test_cancel_state_held_for_its_join(self):
        log: list = []
        a_done, b_gate = asyncio.Event(), asyncio.Event()
        agent = Agent("cancelj", isolation="inline")

        async def start(context):
            return ["a", "b"]

        async def a(context):
            a_done.set()
            return "merge"

        async def b(context):
            await b_gate.wait()
            return "merge"

        async def merge(context):
            log.append("merge")
            return "after"

        async def after(context):
            log.append("after")

        for state in (start, a, b, merge, after):
            agent.add_state(state.__name__, state)
        task = asyncio.create_task(agent.run())
        await a_done.wait()
        while agent.state_metadata["a"].status is not StateStatus.COMPLETED:
            await asyncio.sleep(0)
        assert agent.cancel_state("merge") is True  # held: a arrived, b is on its way
        checkpoint = agent.create_checkpoint()
        b_gate.set()  # b arrives at the cancelled join: its branch ends there too
        await task
        assert log == [] and agent.status is AgentStatus.COMPLETED
        assert agent.state_metadata["merge"].status is StateStatus.CANCELLED
        assert checkpoint.frames["groups"][1]["cancelled"] == ["merge"]  # and so after a resume

    async def test_cancel_unknown(self):
        from agent import UnknownStateError

        with pytest.raises(UnknownStateError):
            Agent("x").cancel_state("nope")

    async def test_cancel_all(self):
        started = asyncio.Event()
        agent = Agent("all", isolation="inline")
        agent.add_state("s", blocking(started, []))
        task = asyncio.create_task(agent.run())
        await started.wait()
        await agent.cancel_all()
        assert await task is agent.context
        assert agent.status is AgentStatus.CANCELLED
        assert agent.state_metadata["s"].status is StateStatus.CANCELLED
        assert not agent._running_states

    async def test_cancel_all_cancels_a_join_held_for_a_branch(self):
        fast_done = asyncio.Event()
        agent = Agent("all_held", isolation="inline")

        async def start(context):
            return ["fast", "slow"]

        async def fast(context):
            fast_done.set()
            return "join"

        async def slow(context):
            await asyncio.Event().wait()
            return "join"

        async def join(context):
            return None

        for state in (start, fast, slow, join):
            agent.add_state(state.__name__, state)
        cancelled: list[str] = []
        agent.add_observer(lambda e: cancelled.append(e.state) if e.kind == ev.STATE_CANCELLED else None)
        task = asyncio.create_task(agent.run())
        await fast_done.wait()
        while agent.state_metadata["fast"].status is not StateStatus.COMPLETED:
            await asyncio.sleep(0)
        await agent.cancel_all()
        await task
        assert {name: agent.state_metadata[name].status for name in ("slow", "join")} == {
            "slow": StateStatus.CANCELLED, "join": StateStatus.CANCELLED}
        # Each state it made CANCELLED says so once, the held join too (as cancel_state's does).
        assert sorted(cancelled) == ["join", "slow"]


class TestPauseResume:
    """pause() stops and checkpoints; resume() continues without redoing finished work."""

    async def test_a_resume_before_the_paused_state_has_stopped(self):
        # The attempt ends after the resume: it runs again, instead of parking for a pause
        # that is over (the run then went round and round, waiting on nothing).
        log: list = []
        started, stop_now = asyncio.Event(), asyncio.Event()
        agent = Agent("quick_resume", isolation="inline")

        async def slow_to_stop(context):
            log.append(context.attempt)
            started.set()
            if len(log) > 1:
                return None
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await stop_now.wait()  # stopping takes a while
                raise

        agent.add_state("s", slow_to_stop)
        task = asyncio.create_task(agent.run())
        await started.wait()
        pausing = asyncio.create_task(agent.pause())
        while not agent._run.pause_requested:
            await asyncio.sleep(0)
        await agent.resume()  # before pause() returned, while s still stops
        stop_now.set()
        await asyncio.wait_for(asyncio.gather(pausing, task), 10)
        assert agent.status is AgentStatus.COMPLETED and log == [1, 1]

    async def test_a_pause_from_inside_a_state(self):
        calls: list = []
        agent = Agent("self_pausing", isolation="inline")

        async def pauses(context):
            calls.append(context.attempt)
            if len(calls) == 1:
                await agent.pause()  # it is stopped too, and runs again on resume
                await asyncio.Event().wait()

        agent.add_state("pauses", pauses)
        task = asyncio.create_task(agent.run())
        while agent.status is not AgentStatus.PAUSED or agent._running_states:
            await asyncio.sleep(0)
        assert agent.state_metadata["pauses"].waiting_for == "the run to resume: it is paused"
        await agent.resume()
        await asyncio.wait_for(task, 10)
        assert agent.status is AgentStatus.COMPLETED and calls == [1, 1]

    async def test_pause_and_resume_same_run(self):
        log: list = []
        started = asyncio.Event()
        agent = Agent("pause", isolation="inline")

        async def first(context):
            log.append("first")
            return "second"

        async def second(context):
            log.append(("second", context.attempt))
            started.set()
            if context.get_state("resumed"):
                return None
            await asyncio.Event().wait()

        agent.add_state("first", first)
        agent.add_state("second", second)
        task = asyncio.create_task(agent.run())
        await started.wait()
        checkpoint = await agent.pause()
        assert agent.status is AgentStatus.PAUSED
        assert checkpoint.completed_states == {"first"}
        assert checkpoint.running_states == [] and "second" in checkpoint.pending_states
        agent.context.set_state("resumed", True)
        await agent.resume()
        await task
        assert agent.status is AgentStatus.COMPLETED
        assert log == ["first", ("second", 1), ("second", 1)]  # a paused attempt is not a failed one

    async def test_a_paused_attempt_says_so_and_the_pause_is_no_dependency_wait(self):
        # s waits for a gate; x waits for s at most 0.3 s. Paused for longer than that,
        # the run goes on after resume: time paused is no dependency's wait.
        gate, started = asyncio.Event(), asyncio.Event()
        seen: list[tuple[str, str | None]] = []
        agent = Agent("paused_wait", isolation="inline")

        async def s(context):
            started.set()
            await gate.wait()

        async def x(context):
            return None

        agent.add_state("s", s)
        agent.add_state("x", x, dependencies={"s": DependencyConfig(timeout=0.3)})
        agent.add_observer(lambda e: seen.append((e.kind, e.state)) if e.state == "s" else None)
        task = asyncio.create_task(agent.run())
        await started.wait()
        await agent.pause()
        await asyncio.sleep(0.6)  # the time paused, longer than x's dependency timeout
        assert not task.done() and agent.status is AgentStatus.PAUSED
        gate.set()
        await agent.resume()
        await asyncio.wait_for(task, 10)
        assert agent.state_metadata["x"].status is StateStatus.COMPLETED
        assert seen == [(ev.STATE_STARTED, "s"), (ev.STATE_PAUSED, "s"), (ev.STATE_STARTED, "s"),
                        (ev.STATE_COMPLETED, "s")]

    async def test_a_run_that_times_out_while_paused_cancels_what_was_paused(self):
        started = asyncio.Event()
        agent = Agent("paused_out", isolation="inline")

        async def s(context):
            started.set()
            await asyncio.Event().wait()

        agent.add_state("s", s)
        task = asyncio.create_task(agent.run(timeout=0.3))
        await started.wait()
        await agent.pause()
        with pytest.raises(RunTimeoutError):
            await asyncio.wait_for(task, 10)
        assert agent.state_metadata["s"].status is StateStatus.CANCELLED  # not left PENDING

    async def test_a_pause_before_the_run_begins_holds_it_until_resume(self):
        agent, log = _logging_agent("early")
        task = asyncio.create_task(agent.run())  # not started yet
        await agent.pause()
        for _ in range(20):
            await asyncio.sleep(0)
        assert agent.status is AgentStatus.PAUSED and log == [] and not task.done()
        await agent.resume()
        await task
        assert agent.status is AgentStatus.COMPLETED and log == ["first"]

    async def test_a_pause_with_no_run_is_let_go_by_resume(self):
        agent, log = _logging_agent("held")
        await agent.pause()  # no run() yet: the next one would start paused
        assert agent.status is AgentStatus.PAUSED
        await agent.resume()  # none began: nothing to resume, and nothing is held any more
        assert agent.status is AgentStatus.IDLE and log == []
        assert agent.state_metadata["first"].status is StateStatus.PENDING and not agent.completed_states
        await agent.run()
        assert agent.status is AgentStatus.COMPLETED and log == ["first"]

    async def test_the_checkpoint_of_a_hold_restores_an_agent_that_has_not_run(self):
        agent, _ = _logging_agent("held")
        checkpoint = await agent.pause()  # before any run: nothing of a run is in it
        restored, log = _logging_agent("held")
        await restored.restore_from_checkpoint(checkpoint)
        assert restored.status is AgentStatus.IDLE
        await restored.run()  # from its first state, not "resumed" into nothing
        assert restored.status is AgentStatus.COMPLETED and log == ["first"]

    async def test_resume_with_nothing_paused_runs_nothing(self):
        agent, log = _logging_agent("over")
        await agent.resume()  # never ran
        assert agent.status is AgentStatus.IDLE and log == []
        await agent.run()
        await agent.resume()  # its run is over
        assert agent.status is AgentStatus.COMPLETED and log == ["first"]

    async def test_restoring_a_completed_run_runs_nothing_again(self):
        log: list = []

        def build() -> Agent:
            agent = Agent("done", isolation="inline")

            async def first(context):
                log.append("first")
                context.set_state("x", 1)
                return "second"

            async def second(context):
                log.append("second")

            agent.add_state("first", first)
            agent.add_state("second", second)
            return agent

        original = build()
        await original.run()
        restored = build()
        await restored.restore_from_checkpoint(original.create_checkpoint())
        context = await restored.run()
        assert log == ["first", "second"] and context.get_state("x") == 1
        assert restored.status is AgentStatus.COMPLETED
        fresh = await restored.run()  # a new run, from the start, on a fresh context
        assert log == ["first", "second", "first", "second"]
        assert fresh is not context and context.get_state("x") == 1
        assert fresh.keys() == ["x"]

    async def test_restoring_the_checkpoint_of_an_agent_that_never_ran_runs_it(self):
        log: list = []

        def build() -> Agent:
            agent = Agent("never_ran", isolation="inline")

            async def first(context):
                log.append(("first", context.get_state("seed")))
                return "second"

            async def second(context):
                log.append(("second", None))

            agent.add_state("first", first)
            agent.add_state("second", second)
            return agent

        idle = build()
        idle.context.set_state("seed", 7)
        restored = build()
        await restored.restore_from_checkpoint(idle.create_checkpoint())
        await restored.run()
        assert log == [("first", 7), ("second", None)]
        assert restored.status is AgentStatus.COMPLETED

    async def test_checkpoint_json_round_trip_and_restore(self):
        log: list = []
        started = asyncio.Event()

        def build(name: str) -> Agent:
            agent = Agent(name, isolation="inline")

            async def start(context):
                log.append("start")
                context.set_state("items", {1, 2, 3})
                return ["a", "b"]

            async def a(context):
                log.append("a")
                return "merge"

            async def b(context):
                log.append("b")
                started.set()
                if not context.get_state("go"):
                    await asyncio.Event().wait()
                return "merge"

            async def merge(context):
                log.append("merge")

            for n, f in (("start", start), ("a", a), ("b", b), ("merge", merge)):
                agent.add_state(n, f)
            return agent

        agent = build("flow")
        task = asyncio.create_task(agent.run())
        await started.wait()
        checkpoint = await agent.pause()
        await agent.cancel_all()
        await task
        data = json.loads(json.dumps(checkpoint.to_dict()))
        restored = AgentCheckpoint.from_dict(data)
        assert restored.context["items"] == {1, 2, 3}

        log.clear()
        again = build("flow")
        await again.restore_from_checkpoint(restored)
        again.context.set_state("go", True)
        await again.run()
        assert log == ["b", "merge"]  # start and a are not re-run; the join still runs once
        assert again.completed_states >= {"start", "a", "b", "merge"}

    async def test_restore_refuses_missing_states(self):
        agent = Agent("one", isolation="inline")

        async def s(context):
            return None

        agent.add_state("s", s)
        await agent.run()
        checkpoint = agent.create_checkpoint()
        lacking = Agent("one", isolation="inline")
        lacking.add_state("t", s)
        with pytest.raises(CheckpointError, match="does not have: s"):
            await lacking.restore_from_checkpoint(checkpoint)

    async def test_a_state_that_pauses_its_own_run_goes_on_to_what_it_returns_on_resume(self):
        """It stops as it returns (before, what it returned was thrown away and it ran again on
        resume, pausing again: the run never ended)."""
        log: list[str] = []
        agent = Agent("self_pause", isolation="inline")

        async def s1(context):
            log.append("s1")
            await agent.pause()
            return "s2"

        async def s2(context):
            log.append("s2")

        agent.add_state("s1", s1)
        agent.add_state("s2", s2)
        run = asyncio.ensure_future(agent.run())
        while agent.status is not AgentStatus.PAUSED:
            await asyncio.sleep(0.01)
        await agent.resume()
        await asyncio.wait_for(run, 30)
        assert log == ["s1", "s2"] and agent.status is AgentStatus.COMPLETED
        assert [h.outcome for h in agent.state_metadata["s1"].history] == ["completed"]

    async def test_restore_into_an_agent_of_another_name_with_the_same_states(self, tmp_path):
        """The spec's ``new_agent = Agent("restored_workflow")``, its states added first: it
        continues the run (completed states not re-run) as a run of its own, under a new id,
        saved in a store that also holds the first agent's run."""
        ran: list[str] = []
        started = asyncio.Event()

        async def first(context):
            ran.append("first")
            return "second"

        async def second(context):
            ran.append("second")
            started.set()
            if context.get_state("restored"):
                return None
            await asyncio.Event().wait()

        def build(name):
            agent = Agent(name, isolation="inline", checkpoint_store=tmp_path / "runs.sqlite3")
            agent.add_state("first", first)
            agent.add_state("second", second)
            return agent

        original = build("workflow")
        task = asyncio.create_task(original.run())
        await started.wait()
        checkpoint = await original.pause()
        task.cancel()
        new_agent = build("restored_workflow")
        await new_agent.restore_from_checkpoint(checkpoint)
        new_agent.context.set_state("restored", True)
        await new_agent.resume()
        assert new_agent.status is AgentStatus.COMPLETED
        assert ran == ["first", "second", "second"]
        assert new_agent.run_id and new_agent.run_id != original.run_id
        assert new_agent.checkpoint_store.latest(new_agent.run_id).agent_name == "restored_workflow"

    async def test_restore_into_empty_agent_adopts_data(self):
        agent = Agent("workflow", isolation="inline")

        async def s(context):
            context.set_state("x", 1)

        agent.add_state("s", s)
        await agent.run()
        new_agent = Agent("restored_workflow")
        await new_agent.restore_from_checkpoint(agent.create_checkpoint())
        assert new_agent.context.get_state("x") == 1
        assert new_agent.completed_states == {"s"}
        assert new_agent.status is AgentStatus.COMPLETED

    async def test_future_format_version(self):
        data = AgentCheckpoint("a", "running", set(), [], [], {}, {}).to_dict()
        data["format_version"] = 99
        with pytest.raises(CheckpointError, match="format version 99"):
            AgentCheckpoint.from_dict(data)


class TestResumeKeepsStepCount:
    """max_steps bounds the whole run, also across a checkpoint and resume."""

    async def test_steps_before_the_pause_count(self):
        from agent import MaxStepsExceededError

        reached = asyncio.Event()

        def build() -> Agent:
            agent = Agent("loop", isolation="inline", max_steps=6)

            async def spin(context):
                n = context.get_state("n", 0) + 1
                context.set_state("n", n)
                if n == 3 and not context.get_state("resumed"):
                    reached.set()
                    await asyncio.Event().wait()
                return "spin"

            agent.add_state("spin", spin)
            return agent

        first = build()
        task = asyncio.create_task(first.run())
        await reached.wait()
        checkpoint = await first.pause()
        await first.cancel_all()
        await task
        again = build()
        await again.restore_from_checkpoint(checkpoint)
        again.context.set_state("resumed", True)
        with pytest.raises(MaxStepsExceededError):
            await again.run()
        # 3 activations before the pause (the third re-runs on resume and writes n=4), then
        # 3 more; without the saved count it would go on to n=10.
        assert again.context.get_state("n") == 7


def test_pause_resume_and_cancel_all_from_another_thread_act_on_the_runs_loop():
    """A web app's request thread steers a run that run_sync() drives in another thread."""
    import threading

    agent = Agent("threaded", isolation="inline")
    started = threading.Event()

    async def long(context):
        started.set()
        await asyncio.sleep(3600)

    agent.add_state("long", long)
    runner = threading.Thread(target=lambda: agent.run_sync())
    runner.start()
    try:
        assert started.wait(30)
        asyncio.run(agent.pause())
        assert agent.status is AgentStatus.PAUSED
        started.clear()
        asyncio.run(agent.resume())
        assert started.wait(30)  # the state runs again
        asyncio.run(agent.cancel_all())
        assert agent.status is AgentStatus.CANCELLED  # it returned once the run had ended
    finally:
        runner.join(30)
    assert not runner.is_alive()


@pytest.mark.parametrize("driving", ["run_until_complete", "settles_at_once"])
def test_cancel_all_from_another_thread_returns_however_the_loop_ends(driving):
    """The run's loop may stop the moment its run() returns (``run_until_complete`` then
    ``close``), and a run whose states never await ends before its loop turns again: the
    caller of cancel_all() elsewhere still hears that it is over."""
    import threading

    agent = Agent("manual", isolation="inline")
    started = threading.Event()

    async def waits(context):
        started.set()
        await asyncio.sleep(3600)

    async def returns(context):
        started.set()

    agent.add_state("s", waits if driving == "run_until_complete" else returns)

    def drive():
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(agent.run())
        finally:
            loop.close()

    runner = threading.Thread(target=drive)
    runner.start()
    try:
        assert started.wait(30)
        asyncio.run(asyncio.wait_for(agent.cancel_all(), 30))
    finally:
        runner.join(30)
    assert not runner.is_alive()
    assert agent.status in (AgentStatus.CANCELLED, AgentStatus.COMPLETED)  # it may have ended first
