"""Observers see every run's events, attached per agent or around a block of code."""

from __future__ import annotations

from agent import Agent, RetryPolicy, observing
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
