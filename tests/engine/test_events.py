"""Observers see every run's events, attached per agent or around a block of code."""

from __future__ import annotations

import pytest

from agent import Agent, InvalidTransitionError, RetryPolicy, StateFailedError, observing
from agent import events as ev


async def ok(context):
    return "flaky"


def make_flaky():
    calls = []

    async def flaky(context):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first try fails")

    return flaky


class TestObservers:
    """Events tell what happened, in order, with attempts and durations."""

    async def test_agent_observer(self):
        seen: list[ev.RunEvent] = []
        agent = Agent("observed", isolation="inline")
        agent.add_state("ok", ok)
        agent.add_state("flaky", make_flaky(), retry_policy=RetryPolicy(max_retries=1, initial_delay=0.0))
        agent.add_observer(seen.append)
        await agent.run()
        kinds = [(e.kind, e.state, e.attempt) for e in seen]
        assert kinds == [
            (ev.RUN_STARTED, None, 0),
            (ev.STATE_STARTED, "ok", 1),
            (ev.STATE_COMPLETED, "ok", 1),
            (ev.STATE_STARTED, "flaky", 1),
            (ev.STATE_FAILED, "flaky", 1),
            (ev.STATE_RETRYING, "flaky", 1),
            (ev.STATE_STARTED, "flaky", 2),
            (ev.STATE_COMPLETED, "flaky", 2),
            (ev.RUN_FINISHED, None, 0),
        ]
        assert seen[-1].status == "completed"
        assert seen[4].error == "RuntimeError: first try fails" and seen[4].data["final"] is False
        assert all(e.duration is not None and e.duration >= 0 for e in seen if e.kind == ev.STATE_COMPLETED)
        assert len({e.run_id for e in seen}) == 1

    async def test_ambient_observer_sees_runs_inside_the_block(self):
        seen: list[ev.RunEvent] = []
        first = Agent("one", isolation="inline")
        first.add_state("ok", ok)
        first.add_state("flaky", make_flaky(), max_retries=1)
        with observing(seen.append):
            await first.run()
        outside = Agent("two", isolation="inline")
        outside.add_state("only", ok)
        outside.add_state("flaky", make_flaky(), max_retries=1)
        await outside.run()
        assert {e.agent_name for e in seen} == {"one"}

    async def test_broken_observer_is_detached_and_the_run_goes_on(self):
        calls = []

        def broken(event):
            calls.append(event.kind)
            raise RuntimeError("observer bug")

        agent = Agent("robust", isolation="inline")
        agent.add_state("ok", ok)
        agent.add_state("flaky", make_flaky(), max_retries=1)
        agent.add_observer(broken)
        await agent.run()
        assert calls == [ev.RUN_STARTED]
        assert agent.status.value == "completed"


class TestAttachedWhileARunGoesOn:
    """add_observer and remove_observer take effect at once, in a run in progress too."""

    async def test_an_observer_added_and_one_removed_mid_run(self):
        import asyncio

        started, release = asyncio.Event(), asyncio.Event()
        agent = Agent("attached_late", isolation="inline")

        async def first(context):
            started.set()
            await release.wait()
            return "second"

        async def second(context):
            return None

        agent.add_state("first", first)
        agent.add_state("second", second)
        early: list[ev.RunEvent] = []
        late: list[ev.RunEvent] = []
        agent.add_observer(early.append)
        run = asyncio.create_task(agent.run())
        await started.wait()
        agent.add_observer(late.append)
        agent.remove_observer(early.append)
        release.set()
        await run
        assert [(e.kind, e.state) for e in early] == [(ev.RUN_STARTED, None), (ev.STATE_STARTED, "first")]
        assert [(e.kind, e.state) for e in late] == [
            (ev.STATE_COMPLETED, "first"), (ev.STATE_STARTED, "second"), (ev.STATE_COMPLETED, "second"),
            (ev.RUN_FINISHED, None),
        ]


class TestEveryEndIsTold:
    """Each state that started or waited ends with an event, and each run with run_finished."""

    async def test_a_run_whose_caller_went_away_is_finished(self):
        import asyncio

        seen: list[ev.RunEvent] = []
        started = asyncio.Event()
        agent = Agent("abandoned", isolation="inline")

        async def waits(context):
            started.set()
            await asyncio.Event().wait()

        agent.add_state("waits", waits)
        agent.add_observer(seen.append)
        run = asyncio.create_task(agent.run())
        await started.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert [(e.kind, e.status) for e in seen][-1] == (ev.RUN_FINISHED, "cancelled")

    async def test_a_result_that_is_no_transition_fails_the_state_with_an_event(self):
        seen: list[ev.RunEvent] = []
        agent = Agent("bad_result", isolation="inline")

        async def returns_a_number(context):
            return 42

        agent.add_state("s", returns_a_number)
        agent.add_observer(seen.append)
        with pytest.raises(InvalidTransitionError):
            await agent.run()
        failed = [e for e in seen if e.kind == ev.STATE_FAILED]
        assert [(e.state, e.attempt, e.data["final"]) for e in failed] == [("s", 1, True)]
        assert agent.state_metadata["s"].status.value == "failed"

    @pytest.mark.parametrize("on_failure", ["fail", "continue"])
    async def test_a_state_reads_as_its_event_says_when_it_is_told(self, on_failure):
        """At STATE_FAILED (final) its status is FAILED already, as COMPLETED is at
        STATE_COMPLETED; at a failure it is retried after, it is not."""
        read: list[tuple[str, int, str]] = []
        agent = Agent("told", isolation="inline")

        async def fails(context):
            raise RuntimeError("no")

        agent.add_state("ok", ok)
        agent.add_state("flaky", fails, retry_policy=RetryPolicy(max_retries=1, initial_delay=0.0),
                        on_failure=on_failure)
        agent.add_observer(lambda e: read.append((e.kind, e.attempt, agent.state_metadata[e.state].status.value))
                           if e.state is not None else None)
        with pytest.raises(StateFailedError):  # at once, or (continue) once the rest has run
            await agent.run()
        assert (ev.STATE_COMPLETED, 1, "completed") in read
        assert [r for r in read if r[0] == ev.STATE_FAILED] == [
            (ev.STATE_FAILED, 1, "running"), (ev.STATE_FAILED, 2, "failed")]

    async def test_cancelling_a_waiting_or_held_state_is_told(self):
        import asyncio

        from agent import DependencyType

        seen: list[ev.RunEvent] = []
        gate, started = asyncio.Event(), asyncio.Event()
        agent = Agent("told", isolation="inline")

        async def fan(context):
            return ["slow", "fast"]

        async def slow(context):
            started.set()
            await gate.wait()
            return "join"

        async def fast(context):
            return "join"

        agent.add_state("fan", fan)
        agent.add_state("slow", slow)
        agent.add_state("fast", fast)
        agent.add_state("join", ok, next_states=[])
        agent.add_state("waiting", ok, dependencies={"slow": DependencyType.REQUIRED}, next_states=[])
        agent.add_observer(seen.append)
        run = asyncio.create_task(agent.run())
        await started.wait()
        while agent.state_metadata["join"].waiting_for is None:  # fast reached the join: held there
            await asyncio.sleep(0)
        assert agent.cancel_state("join") and agent.cancel_state("waiting")
        gate.set()
        await run
        cancelled = {e.state for e in seen if e.kind == ev.STATE_CANCELLED}
        assert cancelled >= {"join", "waiting"}

    async def test_removing_an_observer_leaves_it_what_it_sees_around_the_block(self):
        import asyncio

        seen: list[ev.RunEvent] = []
        started, release = asyncio.Event(), asyncio.Event()
        agent = Agent("both_ways", isolation="inline")

        async def waits(context):
            started.set()
            await release.wait()

        agent.add_state("waits", waits)
        agent.add_observer(seen.append)
        with observing(seen.append):
            run = asyncio.create_task(agent.run())
            await started.wait()
        agent.remove_observer(seen.append)  # still attached around the block the run started in
        release.set()
        await run
        assert [e.kind for e in seen] == [ev.RUN_STARTED, ev.STATE_STARTED, ev.STATE_COMPLETED, ev.RUN_FINISHED]
