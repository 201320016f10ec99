"""Every DependencyType and DependencyLifecycle, conditions and wait timeouts."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent import (
    Agent,
    AgentCheckpoint,
    DependencyConfig,
    DependencyLifecycle,
    DependencyTimeoutError,
    DependencyType,
    InvalidConfigurationError,
    StateFailedError,
    StateStatus,
)
from agent.checkpoint_store import SQLiteCheckpointStore


def recorder(log: list, result=None, *, wait: asyncio.Event | None = None, fail: bool = False):
    async def state(context):
        log.append(("start", context.state_name))
        if wait is not None:
            await wait.wait()
        if fail:
            raise RuntimeError(f"{context.state_name} broke")
        log.append(("end", context.state_name))
        return result

    return state


async def _async_condition(agent):
    return True


class TestTypes:
    """REQUIRED, OPTIONAL, PARALLEL and SEQUENTIAL decide when a dependent may start."""

    async def test_required_waits_for_completion_even_if_never_returned(self):
        log: list = []
        agent = Agent("req", isolation="inline")
        agent.add_state("prepare_data", recorder(log))
        agent.add_state("final_step", recorder(log), dependencies={"prepare_data": DependencyType.REQUIRED})
        await agent.run()
        assert log == [
            ("start", "prepare_data"), ("end", "prepare_data"), ("start", "final_step"), ("end", "final_step"),
        ]

    async def test_required_returned_state_waits(self):
        log: list = []
        agent = Agent("req2", isolation="inline")
        agent.add_state("start", recorder(log, ["a", "b"]))
        gate = asyncio.Event()
        agent.add_state("a", recorder(log, None, wait=gate))
        agent.add_state("b", recorder(log, None), dependencies={"a": DependencyType.REQUIRED})

        async def opener():
            while ("start", "a") not in log:
                await asyncio.sleep(0)
            assert ("start", "b") not in log
            gate.set()

        await asyncio.gather(agent.run(), opener())
        assert log.index(("start", "b")) > log.index(("end", "a"))
        assert agent.state_metadata["b"].runs == 1

    async def test_required_failure_blocks_dependent(self):
        log: list = []
        agent = Agent("blocked", isolation="inline")
        agent.add_state("start", recorder(log, ["dep", "other"]))
        agent.add_state("dep", recorder(log, fail=True))
        agent.add_state("other", recorder(log))
        agent.add_state("dependent", recorder(log), dependencies={"dep": DependencyType.REQUIRED})
        with pytest.raises(StateFailedError, match="'dep' failed"):
            await agent.run()
        assert ("start", "dependent") not in log
        meta = agent.state_metadata["dependent"]
        assert meta.status is StateStatus.BLOCKED  # the run says why
        assert "required dependency 'dep' ended failed" in meta.blocked_reason

    async def test_a_failed_requirement_blocks_a_returned_dependent_too(self):
        log: list = []
        agent = Agent("blocked_returned", isolation="inline")
        agent.add_state("start", recorder(log, ["dep", "dependent"]))
        agent.add_state("dep", recorder(log, fail=True))
        agent.add_state("dependent", recorder(log), dependencies={"dep": DependencyType.REQUIRED})
        with pytest.raises(StateFailedError, match="'dep' failed"):
            await agent.run()
        meta = agent.state_metadata["dependent"]
        assert meta.status is StateStatus.BLOCKED
        assert "'dep'" in meta.blocked_reason

    async def test_required_never_run_is_blocked_at_the_end(self):
        log: list = []
        agent = Agent("never", isolation="inline")
        agent.add_state("start", recorder(log))
        agent.add_state("dep", recorder(log))
        agent.add_state("dependent", recorder(log), dependencies={"dep": DependencyType.REQUIRED})
        await agent.run()
        meta = agent.state_metadata["dependent"]
        assert meta.status is StateStatus.BLOCKED
        assert "'dep'" in meta.blocked_reason

    async def test_a_failed_run_blocks_the_whole_chain_it_cut_off(self):
        # c depends on b, b on a, a on start (added in reverse): start fails, the run
        # fails, and all three never ran because of it.
        log: list = []
        agent = Agent("cut_off_chain", isolation="inline")
        agent.add_state("start", recorder(log, fail=True))
        for name, dep in (("c", "b"), ("b", "a"), ("a", "start")):
            agent.add_state(name, recorder(log), dependencies={dep: DependencyType.REQUIRED})
        with pytest.raises(StateFailedError):
            await agent.run()
        for name, dep in (("a", "start"), ("b", "a"), ("c", "b")):
            meta = agent.state_metadata[name]
            assert meta.status is StateStatus.BLOCKED, name
            assert f"required dependency {dep!r}" in meta.blocked_reason

    async def test_cancel_all_cancels_states_waiting_on_dependencies(self):
        log: list = []
        gate = asyncio.Event()
        agent = Agent("cancel_waiting", isolation="inline")
        agent.add_state("slow", recorder(log, wait=gate))
        for kind in DependencyType:
            agent.add_state(kind.name.lower(), recorder(log), dependencies={"slow": kind})
        cancelled: list[str] = []
        agent.add_observer(lambda e: cancelled.append(e.state) if e.kind == "state_cancelled" else None)
        runner = asyncio.ensure_future(agent.run())
        while ("start", "slow") not in log:
            await asyncio.sleep(0)
        await agent.cancel_all()
        await runner
        assert agent.status.name == "CANCELLED"
        statuses = {name: meta.status for name, meta in agent.state_metadata.items()}
        # PARALLEL started beside slow (and was cancelled running, or completed already).
        waiting = {name: status for name, status in statuses.items() if name not in ("parallel",)}
        assert set(waiting.values()) == {StateStatus.CANCELLED}, statuses
        # Each says so once, those that waited on their dependency too.
        told = [name for name in cancelled if name != "parallel"]
        assert sorted(told) == sorted(waiting), cancelled
        assert agent.state_metadata["required"].blocked_reason is None

    async def test_optional_runs_when_dependency_is_not_scheduled(self):
        log: list = []
        agent = Agent("opt", isolation="inline")
        agent.add_state("start", recorder(log))
        agent.add_state("validate", recorder(log))
        agent.add_state("final", recorder(log), dependencies={"validate": DependencyType.OPTIONAL})
        await agent.run()
        assert ("end", "final") in log
        assert ("start", "validate") not in log

    async def test_optional_waits_while_dependency_is_running(self):
        log: list = []
        gate = asyncio.Event()
        agent = Agent("opt2", isolation="inline")
        agent.add_state("validate", recorder(log, wait=gate))
        agent.add_state("final", recorder(log), dependencies={"validate": DependencyType.OPTIONAL})

        async def opener():
            while ("start", "validate") not in log:
                await asyncio.sleep(0)
            for _ in range(5):
                await asyncio.sleep(0)
            assert ("start", "final") not in log
            gate.set()

        await asyncio.gather(agent.run(), opener())
        assert log.index(("start", "final")) > log.index(("end", "validate"))

    async def test_parallel_starts_alongside(self):
        log: list = []
        both = asyncio.Event()
        agent = Agent("par", isolation="inline")

        async def background(context):
            log.append("bg-start")
            await both.wait()  # finishes only after the dependent started
            log.append("bg-end")

        async def final(context):
            log.append("final")
            both.set()

        agent.add_state("background_task", background)
        agent.add_state("final", final, dependencies={"background_task": DependencyType.PARALLEL})
        await asyncio.wait_for(agent.run(), 10)
        assert log == ["bg-start", "final", "bg-end"]

    async def test_sequential_runs_after_failure_too(self):
        log: list = []
        agent = Agent("seq", isolation="inline")
        agent.add_state("start", recorder(log, ["previous_step", "after"]))
        agent.add_state("previous_step", recorder(log))
        agent.add_state("after", recorder(log), dependencies={"previous_step": DependencyType.SEQUENTIAL})
        await agent.run()
        assert log.index(("start", "after")) > log.index(("end", "previous_step"))


class TestLongChains:
    """A chain deeper than Python's recursion limit runs, and its chain lengths are counted."""

    async def test_a_chain_of_1200_states_reports_every_chain_length(self):
        n = 1200  # over the default recursion limit (1000)
        agent = Agent("long_chain", isolation="inline", max_steps=n + 10)
        for i in range(n):
            agent.add_state(f"s{i}", recorder([]), dependencies=[f"s{i - 1}"] if i else [])
        resolved: dict[str, int] = {}
        agent.add_observer(lambda event: resolved.__setitem__(event.state, event.data["chain_length"])
                           if event.kind == "dependency_resolved" else None)
        await agent.run()
        assert all(agent.state_metadata[f"s{i}"].status is StateStatus.COMPLETED for i in range(n))
        assert resolved == {f"s{i}": i for i in range(1, n)}

    async def test_chain_lengths_count_a_state_added_mid_run(self):
        log: list = []
        agent = Agent("grown_chain", isolation="inline")
        resolved: dict[str, int] = {}
        agent.add_observer(lambda event: resolved.__setitem__(event.state, event.data["chain_length"])
                           if event.kind == "dependency_resolved" else None)

        async def first(context):
            # Added during the run, behind b: "late"'s chain is a -> b -> late.
            agent.add_state("late", recorder(log), dependencies=["b"])
            return None

        agent.add_state("a", first)
        agent.add_state("b", recorder(log), dependencies=["a"])
        await agent.run()
        assert resolved == {"b": 1, "late": 2}


class TestEdges:
    """Activations and timeouts that meet at the end of a run."""

    async def test_two_waiting_activations_of_one_state_are_blocked(self):
        # "b" is started and returned by "a": two activations wait for "c", which never runs.
        async def noop(context):
            return None

        async def to_b(context):
            return "b"

        agent = Agent("two_waiting", isolation="inline")
        agent.add_state("c", noop)
        agent.add_state("a", to_b, next_states=["b"])
        agent.add_state("b", noop, dependencies={"c": DependencyType.SEQUENTIAL})
        await agent.run(start=["a", "b"])  # was: IllegalTransitionError, blocked -> blocked
        meta = agent.state_metadata["b"]
        assert meta.status is StateStatus.BLOCKED
        assert meta.blocked_reason == "state 'b' never ran: it was waiting for sequential dependency 'c' to finish"

    async def test_a_returned_and_watched_state_whose_requirement_failed_is_blocked_once(self):
        # "x" is returned by "a" (waiting for "f") and watched for "f" too; "f" fails.
        async def a(context):
            return ["f", "x"]

        async def f(context):
            raise RuntimeError("f broke")

        agent = Agent("blocked_by_both", isolation="inline", on_failure="continue")
        agent.add_state("a", a)
        agent.add_state("f", f)
        agent.add_state("x", recorder([]), dependencies=["f"])
        with pytest.raises(StateFailedError, match="f broke"):  # was: IllegalTransitionError, or a hang
            await agent.run()
        meta = agent.state_metadata["x"]
        assert meta.status is StateStatus.BLOCKED and "'f' ended failed" in meta.blocked_reason

    async def test_a_dependency_timeout_does_not_fail_a_state_that_ran(self):
        # "again" depends on "first" (ALWAYS, timeout 0.05 s), runs once "first" completed,
        # and then waits for "first" to complete again, past the timeout, for good.
        log: list = []
        slow_done = asyncio.Event()

        async def slow(context):
            await asyncio.sleep(0.2)  # the run goes on past the timeout
            slow_done.set()

        always = DependencyConfig(type=DependencyType.REQUIRED, lifecycle=DependencyLifecycle.ALWAYS, timeout=0.05)
        agent = Agent("ran_then_waits", isolation="inline")
        agent.add_state("first", recorder(log, "slow"))
        agent.add_state("again", recorder(log), dependencies={"first": always})
        agent.add_state("slow", slow)
        await agent.run()
        assert slow_done.is_set()
        assert agent.state_metadata["again"].status is StateStatus.COMPLETED
        assert log.count(("end", "again")) == 1

    async def test_a_returned_state_that_ran_does_not_time_out_waiting_again(self):
        # "b" ran once "a" completed; "c" returns it again while it runs, and that activation
        # waits for "a" to complete again past the timeout: it is blocked at the end, not
        # timed out (was: COMPLETED -> TIMEOUT raised in the pump, or DependencyTimeoutError).
        async def b(context):
            await asyncio.sleep(0.05)

        async def c(context):
            await asyncio.sleep(0.02)
            return "b"

        async def slow(context):
            await asyncio.sleep(0.3)  # the run goes on past the timeout

        always = DependencyConfig(type=DependencyType.REQUIRED, lifecycle=DependencyLifecycle.ALWAYS, timeout=0.1)
        agent = Agent("returned_after_it_ran", isolation="inline")
        agent.add_state("a", recorder([]))
        agent.add_state("b", b, dependencies={"a": always})
        agent.add_state("c", c, next_states=["b"])
        agent.add_state("slow", slow)
        await agent.run(start=["a", "c", "slow"])
        meta = agent.state_metadata["b"]
        assert (meta.status, meta.runs) == (StateStatus.BLOCKED, 1)
        assert meta.blocked_reason == "state 'b' did not run again: it was waiting for dependency 'a' to complete"

    async def test_a_state_blocked_by_its_waiting_activation_does_not_time_out_later(self):
        # "x" (returned by "b") waits for a condition that never holds and for "h", which a
        # join holds: when nothing runs, that activation is blocked, "h" is released and runs,
        # and x's own watch reaches the condition's timeout (was: BLOCKED -> TIMEOUT raised).
        async def h(context):
            await asyncio.sleep(0.2)

        agent = Agent("blocked_then_timed", isolation="inline")
        agent.add_state("a", recorder([], "h"), next_states=["h"])
        agent.add_state("b", recorder([], "x"), next_states=["x", "h"])
        agent.add_state("h", h)
        agent.add_state("p", recorder([]))
        agent.add_state("x", recorder([]), dependencies={
            "p": DependencyConfig(type=DependencyType.OPTIONAL, timeout=0.1, condition=lambda agent: False),
            "h": DependencyType.OPTIONAL})
        await agent.run(start=["a", "b"])
        assert agent.state_metadata["x"].status is StateStatus.BLOCKED
        assert agent.state_metadata["h"].status is StateStatus.COMPLETED

    @pytest.mark.parametrize("kind", [DependencyType.OPTIONAL, DependencyType.PARALLEL, DependencyType.SEQUENTIAL])
    async def test_an_always_dependency_triggers_again_only_on_something_new(self, kind):
        # Met once (the source completed, started, or finished by failing), and never again:
        # the dependent runs once. It used to be triggered over and over, for as long as
        # the source was not scheduled (OPTIONAL), had started once (PARALLEL) or had
        # finished without completing (SEQUENTIAL).
        log: list = []
        agent = Agent(f"always_{kind.name.lower()}", isolation="inline", max_steps=50, on_failure="continue")
        agent.add_state("source", recorder(log, fail=kind is DependencyType.SEQUENTIAL))
        agent.add_state("dependent", recorder(log), dependencies={
            "source": DependencyConfig(type=kind, lifecycle=DependencyLifecycle.ALWAYS)})
        if kind is DependencyType.SEQUENTIAL:
            with pytest.raises(StateFailedError, match="source broke"):  # after the rest ran
                await agent.run(start="source")
        else:
            await agent.run(start="source")
        assert log.count(("end", "dependent")) == 1

    async def test_a_parallel_always_dependency_counts_an_activation_not_its_retries(self):
        log: list = []

        async def flaky(context):
            log.append("source")
            await asyncio.sleep(0.01)  # the dependent starts alongside each attempt
            if log.count("source") < 3:
                raise RuntimeError("not yet")

        agent = Agent("parallel_retries", isolation="inline", max_steps=50)
        agent.add_state("source", flaky, max_retries=3)
        agent.add_state("dependent", recorder(log), dependencies={
            "source": DependencyConfig(type=DependencyType.PARALLEL, lifecycle=DependencyLifecycle.ALWAYS)})
        await agent.run(start="source")
        assert log.count("source") == 3 and log.count(("end", "dependent")) == 1

    async def test_a_state_that_ran_does_not_keep_the_run_for_a_condition_timeout(self):
        # "x" runs once "A" completed (its condition held once), and is returned again by
        # "s": that activation waits for a condition that no longer holds, on a dependency
        # whose timeout no longer applies to it. It is blocked once nothing else runs,
        # instead of the run waiting out the 60 s timeout.
        async def a(context):
            return "s"

        async def s(context):
            await asyncio.sleep(0.05)
            return "x"

        held = iter([True])
        agent = Agent("ran_condition_timeout", isolation="inline")
        agent.add_state("A", a)
        agent.add_state("s", s)
        agent.add_state("x", recorder([]), dependencies={"A": DependencyConfig(
            type=DependencyType.OPTIONAL, condition=lambda agent: next(held, False), timeout=60)})
        await agent.run(start="A", timeout=10)  # was: RunTimeoutError, the run waiting for 60 s
        meta = agent.state_metadata["x"]
        assert (meta.status, meta.runs) == (StateStatus.BLOCKED, 1)
        assert "did not run again" in meta.blocked_reason

    async def test_of_two_timeouts_at_once_the_first_added_state_fails(self):
        async def start(context):
            await asyncio.sleep(0.2)  # the run goes on past the timeouts

        agent = Agent("timeouts_at_once", isolation="inline")
        agent.add_state("never", recorder([]))
        agent.add_state("start", start)
        late = DependencyConfig(type=DependencyType.REQUIRED, timeout=0.05)
        for name in ("w1", "w2", "w3", "w4"):
            agent.add_state(name, recorder([]), dependencies={"never": late})
        with pytest.raises(DependencyTimeoutError, match="state 'w1' waited"):
            await agent.run(start="start")


class TestConfig:
    """Conditions, wait timeouts and lifecycles."""

    async def test_condition_must_hold(self):
        log: list = []
        agent = Agent("cond", isolation="inline")

        async def setter(context):
            context.set_state("ready", True)
            log.append("setter")

        cfg = DependencyConfig(type=DependencyType.REQUIRED, condition=lambda a: a.get_state("ready") == True)  # noqa: E712
        agent.add_state("dependency", recorder(log, "setter"))
        agent.add_state("setter", setter)
        agent.add_state("complex_step", recorder(log), dependencies={"dependency": cfg})
        await agent.run()
        assert log.index(("start", "complex_step")) > log.index("setter")

    async def test_condition_never_true_blocks(self):
        log: list = []
        agent = Agent("cond2", isolation="inline")
        cfg = DependencyConfig(condition=lambda a: a.get_state("ready") is True)
        agent.add_state("dependency", recorder(log))
        agent.add_state("complex_step", recorder(log), dependencies={"dependency": cfg})
        await agent.run()
        meta = agent.state_metadata["complex_step"]
        assert meta.status is StateStatus.BLOCKED
        assert "condition" in meta.blocked_reason

    async def test_a_condition_that_never_holds_times_out_though_nothing_else_runs(self):
        log: list = []
        agent = Agent("cond_timeout", isolation="inline")
        cfg = DependencyConfig(condition=lambda a: a.get_state("ready") is True, timeout=0.1)
        agent.add_state("dependency", recorder(log))
        agent.add_state("complex_step", recorder(log), dependencies={"dependency": cfg})
        with pytest.raises(DependencyTimeoutError, match="'complex_step' waited more than 0.1 s"):
            await agent.run()
        assert agent.state_metadata["complex_step"].status is StateStatus.TIMEOUT
        assert ("start", "complex_step") not in log

    async def test_a_timeout_names_the_condition_that_raised(self):
        # The cause was known (a state without a timeout is BLOCKED quoting it) but the
        # timeout said only how long it waited.
        agent = Agent("cond_raises", isolation="inline")
        agent.add_state("a", recorder([]))
        agent.add_state("b", recorder([]), dependencies={"a": DependencyConfig(condition=lambda a: 1 / 0,
                                                                             timeout=0.1)})
        with pytest.raises(DependencyTimeoutError, match=r"waited more than 0.1 s for its dependency 'a': it was "
                                                         r"waiting for condition on 'a' raised ZeroDivisionError"):
            await agent.run()
        assert "ZeroDivisionError" in agent.state_metadata["b"].error.message

    @pytest.mark.parametrize("condition,words", [
        (lambda: True, "must take one argument, the agent"),
        (lambda agent, other: True, "must take one argument, the agent"),
        (_async_condition, "is an async function"),
        (5, "must be callable"),
    ], ids=["no argument", "two", "async", "not callable"])
    def test_a_condition_that_cannot_answer_is_refused_when_made(self, condition, words):
        # Each was taken, then failed at every look (a TypeError, a coroutine never awaited).
        with pytest.raises(InvalidConfigurationError, match=words):
            DependencyConfig(condition=condition)

    async def test_a_timed_wait_on_a_dependency_that_never_runs_blocks_at_once(self):
        # Nothing can complete it any more: waiting out its timeout would only delay the end.
        log: list = []
        agent = Agent("timed_never", isolation="inline")
        cfg = DependencyConfig(condition=lambda a: True, timeout=3600)
        agent.add_state("start", recorder(log))
        agent.add_state("dependency", recorder(log))
        agent.add_state("dependent", recorder(log), dependencies={"dependency": cfg})
        await asyncio.wait_for(agent.run(), 20)
        meta = agent.state_metadata["dependent"]
        assert meta.status is StateStatus.BLOCKED
        assert "'dependency'" in meta.blocked_reason

    async def test_a_condition_comes_true_while_the_writer_still_runs(self):
        # The writer goes on only once the dependent has started: the condition is looked
        # at again as the context changes, not only when a state finishes.
        completed, started = asyncio.Event(), asyncio.Event()
        agent = Agent("cond_live", isolation="inline")

        async def dependency(context):
            completed.set()  # the writer goes on once this state has completed

        async def writer(context):
            await completed.wait()
            context.set_state("ready", True)
            await started.wait()

        async def dependent(context):
            started.set()

        cfg = DependencyConfig(condition=lambda a: a.get_state("ready") is True, timeout=30)
        agent.add_state("start", recorder([], ["writer", "dependency"]))
        agent.add_state("writer", writer)
        agent.add_state("dependency", dependency)
        agent.add_state("dependent", dependent, dependencies={"dependency": cfg})
        await asyncio.wait_for(agent.run(), 20)
        assert agent.state_metadata["dependent"].status is StateStatus.COMPLETED

    async def test_wait_timeout(self):
        gate = asyncio.Event()
        log: list = []
        agent = Agent("timeout", isolation="inline")
        agent.add_state("slow", recorder(log, wait=gate))
        agent.add_state("waiter", recorder(log), dependencies={"slow": DependencyConfig(timeout=0.05)})
        failed: list = []
        agent.add_observer(lambda e: failed.append((e.state, e.data)) if e.kind == "state_failed" else None)
        with pytest.raises(DependencyTimeoutError, match="'waiter' waited more than 0.05 s"):
            await agent.run(cleanup_timeout=1)
        meta = agent.state_metadata["waiter"]
        assert meta.status is StateStatus.TIMEOUT and "waited more than 0.05 s" in meta.error.message
        assert ("start", "waiter") not in log
        # Observers and the monitor see it as a state that timed out for good.
        assert failed == [("waiter", {"final": True, "kind": "timeout", "run_goes_on": False})]

    async def test_always_reruns_on_each_completion(self):
        log: list = []
        agent = Agent("always", isolation="inline")

        async def producer(context):
            n = context.get_state("n", 0) + 1
            context.set_state("n", n)
            log.append(("producer", n))
            return "pause" if n < 3 else None

        async def pause(context):
            # give the dependent a chance to run between producer runs
            while len([x for x in log if x[0] == "consumer"]) < context.get_state("n"):
                await asyncio.sleep(0)
            return "producer"

        async def consumer(context):
            log.append(("consumer", context.get_state("n")))

        agent.add_state("producer", producer)
        agent.add_state("pause", pause)
        agent.add_state("consumer", consumer,
                        dependencies={"producer": DependencyConfig(lifecycle=DependencyLifecycle.ALWAYS)})
        await asyncio.wait_for(agent.run(), 10)
        assert [x for x in log if x[0] == "consumer"] == [("consumer", 1), ("consumer", 2), ("consumer", 3)]

    async def test_once_runs_once(self):
        log: list = []
        agent = Agent("once", isolation="inline")

        async def producer(context):
            n = context.get_state("n", 0) + 1
            context.set_state("n", n)
            return "producer" if n < 3 else None

        async def consumer(context):
            log.append("consumer")

        agent.add_state("producer", producer)
        agent.add_state("consumer", consumer,
                        dependencies={"producer": DependencyConfig(lifecycle=DependencyLifecycle.ONCE)})
        await agent.run()
        assert log == ["consumer"]

    async def test_session_counts_earlier_runs(self):
        log: list = []
        agent = Agent("session", isolation="inline")
        agent.add_state("producer", recorder(log))
        agent.add_state("other", recorder(log))
        agent.add_state("consumer", recorder(log),
                        dependencies={"producer": DependencyConfig(lifecycle=DependencyLifecycle.SESSION)})
        await agent.run(start="producer")
        log.clear()
        await agent.run(start="other")  # producer does not run now, but completed earlier
        assert ("end", "consumer") in log

        fresh = Agent("fresh", isolation="inline")
        fresh.add_state("producer", recorder(log))
        fresh.add_state("other", recorder(log))
        fresh.add_state("consumer", recorder(log),
                        dependencies={"producer": DependencyConfig(lifecycle=DependencyLifecycle.ONCE)})
        await fresh.run(start="producer")
        await fresh.run(start="other")
        assert fresh.state_metadata["consumer"].status is StateStatus.BLOCKED

    async def test_temporary_expires(self):
        log: list = []
        gate = asyncio.Event()
        agent = Agent("temp", isolation="inline")

        async def slow_path(context):
            await gate.wait()

        agent.add_state("start", recorder(log, ["producer", "slow_path"]))
        agent.add_state("producer", recorder(log))
        agent.add_state("slow_path", slow_path)
        agent.add_state("late", recorder(log),
                        dependencies={"producer": DependencyConfig(lifecycle=DependencyLifecycle.TEMPORARY, expiry=0.0),
                                      "slow_path": DependencyType.SEQUENTIAL})

        async def opener():
            while ("end", "producer") not in log:
                await asyncio.sleep(0)
            gate.set()

        await asyncio.gather(agent.run(), opener())
        meta = agent.state_metadata["late"]
        assert meta.status is StateStatus.BLOCKED
        assert "past the TEMPORARY expiry of 0 s" in meta.blocked_reason  # not "to complete": it did

    async def test_periodic_respects_interval(self):
        log: list = []
        agent = Agent("periodic", isolation="inline")

        async def tick(context):
            n = context.get_state("n", 0) + 1
            context.set_state("n", n)
            return "tick" if n < 4 else None

        async def report(context):
            log.append(context.get_state("n"))

        agent.add_state("tick", tick)
        agent.add_state("report", report, dependencies={
            "tick": DependencyConfig(lifecycle=DependencyLifecycle.PERIODIC, interval=3600)})
        await agent.run()
        assert len(log) == 1  # four completions, but at most one run per hour


class TestAcrossACheckpoint:
    """A run restored from a checkpoint meets its dependencies as the run it continues
    would have: what was met stays met, what was consumed is not consumed again."""

    @staticmethod
    def build(kind: DependencyType, log: list[str], gate: asyncio.Event) -> Agent:
        # start -> x -> y (waits for the gate) -> z; d depends on x (kind) and z (REQUIRED).
        agent = Agent("deps_restored", isolation="inline")

        def add(name: str, nxt: str | None, **kwargs) -> None:
            async def state(context):
                if name == "y":
                    await gate.wait()
                log.append(name)
                return nxt

            agent.add_state(name, state, **kwargs)

        add("start", "x")
        add("x", "y")
        add("y", "z")
        add("z", None)
        add("d", None, dependencies={"x": kind, "z": DependencyType.REQUIRED})
        return agent

    @staticmethod
    async def pause_and_restore(build, log: list[str], gate: asyncio.Event, after: str) -> Agent:
        """Run ``build()`` until ``after`` ran, pause it, and run a new agent from its
        checkpoint (through JSON), the gate open; returns that agent."""
        first = build()
        runner = asyncio.create_task(first.run())
        while after not in log:
            await asyncio.sleep(0)
        checkpoint = AgentCheckpoint.from_dict(json.loads(json.dumps((await first.pause()).to_dict())))
        await first.cancel_all()
        await runner
        log.clear()
        gate.set()
        second = build()
        await second.restore_from_checkpoint(checkpoint)
        await asyncio.wait_for(second.run(), 10)
        return second

    @pytest.mark.parametrize("kind", [DependencyType.SEQUENTIAL, DependencyType.PARALLEL, DependencyType.REQUIRED])
    async def test_a_dependency_met_before_the_checkpoint_stays_met(self, kind):
        log: list[str] = []
        gate = asyncio.Event()
        second = await self.pause_and_restore(lambda: self.build(kind, log, gate), log, gate, "x")
        assert second.state_metadata["d"].status is StateStatus.COMPLETED, second.state_metadata["d"].blocked_reason
        assert log == ["y", "z", "d"]

    @staticmethod
    def steps(name: str, chain: tuple[tuple[str, str | None], ...], dep: str, config: DependencyConfig,
              log: list[str], gate: asyncio.Event) -> Agent:
        """The states of ``chain`` (name, next), "y" waiting for ``gate``, and "d", which
        depends on ``dep`` with ``config``; each logs its name."""
        agent = Agent(name, isolation="inline")
        for state_name, nxt in (*chain, ("d", None)):
            async def state(context, state_name=state_name, nxt=nxt):
                if state_name == "y":
                    await gate.wait()
                log.append(state_name)
                return nxt

            agent.add_state(state_name, state, dependencies={dep: config} if state_name == "d" else None)
        return agent

    async def test_an_always_dependency_consumed_before_the_checkpoint_is_not_consumed_again(self):
        # start -> x -> y (waits); d depends on x, ALWAYS: it ran once x completed, before
        # the checkpoint. x completes no more: the restored run does not run d again.
        log: list[str] = []
        gate = asyncio.Event()
        always = DependencyConfig(lifecycle=DependencyLifecycle.ALWAYS)
        chain = (("start", "x"), ("x", "y"), ("y", None))
        await self.pause_and_restore(lambda: self.steps("always_restored", chain, "x", always, log, gate),
                                     log, gate, "d")
        assert log == ["y"]

    async def test_a_parallel_always_dependency_restarted_from_the_checkpoint_is_no_new_start(self):
        # start -> y (waits); d depends on y (PARALLEL, ALWAYS): it ran once y started,
        # before the checkpoint. The restored run re-runs y, the same activation: d runs no more.
        log: list[str] = []
        gate = asyncio.Event()
        always = DependencyConfig(type=DependencyType.PARALLEL, lifecycle=DependencyLifecycle.ALWAYS)
        chain = (("start", "y"), ("y", None))
        await self.pause_and_restore(lambda: self.steps("parallel_restored", chain, "y", always, log, gate),
                                     log, gate, "d")
        assert log == ["y"]


class TestResumingAFailedRun:
    """A failed run resumed after the fix runs what the failure cut off, through dependencies."""

    @staticmethod
    def chain(store: SQLiteCheckpointStore, broken: bool, log: list, on_failure: str = "fail") -> Agent:
        agent = Agent("resumed_chain", isolation="inline", checkpoint_store=store, on_failure=on_failure)
        for i in range(5):
            async def step(context, i=i):
                if broken and i == 1:
                    raise RuntimeError("not fixed yet")
                log.append(i)
                context.set_state(f"v{i}", context.get_state(f"v{i - 1}", 0) + 1)

            agent.add_state(f"s{i}", step, dependencies={f"s{i - 1}": DependencyType.REQUIRED} if i else None)
        return agent

    @pytest.mark.parametrize("on_failure", ["fail", "continue"])
    async def test_every_state_the_failure_cut_off_runs(self, tmp_path, on_failure):
        store = SQLiteCheckpointStore(str(tmp_path / "runs.sqlite3"))
        log: list = []
        first = self.chain(store, True, log, on_failure)
        with pytest.raises(StateFailedError):
            await first.run()
        assert first.state_metadata["s4"].status is StateStatus.BLOCKED
        log.clear()
        fixed = self.chain(store, False, log, on_failure)
        context = await fixed.resume_run(first.run_id)
        statuses = {name: meta.status for name, meta in fixed.state_metadata.items()}
        assert set(statuses.values()) == {StateStatus.COMPLETED}, statuses
        assert log == [1, 2, 3, 4]  # s0 completed before: not run again
        assert context.get_state("v4") == 5
