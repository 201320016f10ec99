"""Transitions: sequential, fan-out, join-once, nested joins, loops, bad returns."""

from __future__ import annotations

import asyncio

import pytest

from agent import (
    Agent,
    AgentStatus,
    InvalidTransitionError,
    MaxStepsExceededError,
    Priority,
    ResourceRequirements,
    StateStatus,
    UnknownNextStateError,
)


def make(agent: Agent, name: str, result, log: list, *, wait: asyncio.Event | None = None):
    async def state(context):
        if wait is not None:
            await wait.wait()
        log.append(name)
        return result

    agent.add_state(name, state)


class TestSequential:
    """A returned name runs next; None ends the run."""

    async def test_chain_runs_in_order(self):
        log: list[str] = []
        agent = Agent("seq", isolation="inline")
        make(agent, "step1", "step2", log)
        make(agent, "step2", "step3", log)
        make(agent, "step3", None, log)
        make(agent, "never", None, log)
        await agent.run()
        assert log == ["step1", "step2", "step3"]
        assert agent.status is AgentStatus.COMPLETED
        assert agent.completed_states == {"step1", "step2", "step3"}
        assert agent.state_metadata["never"].status is StateStatus.PENDING

    async def test_start_argument(self):
        log: list[str] = []
        agent = Agent("seq", isolation="inline")
        make(agent, "a", "b", log)
        make(agent, "b", None, log)
        make(agent, "c", None, log)
        await agent.run(start=["c", "b"])
        assert sorted(log) == ["b", "c"]

    async def test_context_flows_between_states(self):
        agent = Agent("ctx", isolation="inline")

        async def produce(context):
            context.set_state("greeting", "Hello")
            return "consume"

        async def consume(context):
            context.set_state("out", context.get_state("greeting") + "!")

        agent.add_state("produce", produce)
        agent.add_state("consume", consume)
        ctx = await agent.run()
        assert ctx.get_state("out") == "Hello!"
        assert agent.get_state("out") == "Hello!"


class TestFanOutAndJoin:
    """A list runs concurrently; a state returned by several branches runs once, after all."""

    async def test_join_runs_once_after_all_branches(self):
        log: list[str] = []
        gate = asyncio.Event()
        agent = Agent("fan", isolation="inline")
        make(agent, "start", ["a", "b", "c"], log)
        make(agent, "a", "merge", log)
        make(agent, "b", "merge", log, wait=gate)
        make(agent, "c", "merge", log)
        make(agent, "merge", None, log)

        async def release_when_others_done():
            while log.count("a") + log.count("c") < 2:
                await asyncio.sleep(0)
            assert "merge" not in log  # merge must wait for b
            gate.set()

        await asyncio.gather(agent.run(), release_when_others_done())
        assert log.count("merge") == 1
        assert log[-1] == "merge"
        assert set(log[1:4]) == {"a", "b", "c"}

    async def test_branches_run_concurrently(self):
        started = []
        all_in = asyncio.Event()
        agent = Agent("conc", isolation="inline")

        async def start(context):
            return ["x", "y", "z"]

        async def branch(context):
            started.append(context.state_name)
            if len(started) == 3:
                all_in.set()
            await all_in.wait()  # deadlocks unless all three run at once

        agent.add_state("start", start)
        for n in "xyz":
            agent.add_state(n, branch)
        await asyncio.wait_for(agent.run(), 10)
        assert sorted(started) == ["x", "y", "z"]

    async def test_nested_fan_outs_join_at_their_own_level(self):
        log: list[str] = []
        agent = Agent("nested", isolation="inline")
        make(agent, "root", ["left", "right"], log)
        make(agent, "left", ["l1", "l2"], log)
        make(agent, "l1", "left_join", log)
        make(agent, "l2", "left_join", log)
        make(agent, "left_join", "final", log)
        make(agent, "right", "final", log)
        make(agent, "final", None, log)
        await agent.run()
        assert log.count("left_join") == 1
        assert log.count("final") == 1
        assert log.index("left_join") > max(log.index("l1"), log.index("l2"))
        assert log[-1] == "final"

    async def test_duplicates_in_a_list_run_once(self):
        log: list[str] = []
        agent = Agent("dup", isolation="inline")
        make(agent, "start", ["a", "a"], log)
        make(agent, "a", None, log)
        await agent.run()
        assert log == ["start", "a"]

    async def test_empty_list_ends_the_branch(self):
        log: list[str] = []
        agent = Agent("empty", isolation="inline")
        make(agent, "start", [], log)
        await agent.run()
        assert agent.status is AgentStatus.COMPLETED


class TestLoops:
    """A state may run again; max_steps bounds activations."""

    async def test_loop_until_condition(self):
        agent = Agent("loop", isolation="inline")

        async def generate(context):
            n = context.get_state("n", 0) + 1
            context.set_state("n", n)
            return "check"

        async def check(context):
            return "generate" if context.get_state("n") < 3 else None

        agent.add_state("generate", generate)
        agent.add_state("check", check)
        ctx = await agent.run()
        assert ctx.get_state("n") == 3
        assert agent.state_metadata["generate"].runs == 3

    async def test_max_steps(self):
        agent = Agent("forever", isolation="inline", max_steps=10)

        async def spin(context):
            return "spin"

        agent.add_state("spin", spin)
        with pytest.raises(MaxStepsExceededError, match="max_steps=10"):
            await agent.run()
        assert agent.status is AgentStatus.FAILED
        assert agent.state_metadata["spin"].runs == 10


class TestBadTransitions:
    """Unknown names and wrong return types fail the run with a clear error."""

    async def test_unknown_next_state_names_both(self):
        agent = Agent("bad", isolation="inline")

        async def first(context):
            return "secnd"

        agent.add_state("first", first)
        agent.add_state("second", first)
        with pytest.raises(UnknownNextStateError) as info:
            await agent.run()
        assert "'first' returned 'secnd'" in str(info.value)
        assert "did you mean 'second'" in str(info.value)
        assert agent.status is AgentStatus.FAILED

    async def test_the_name_suggested_is_another_state_before_the_one_that_returned(self):
        agent = Agent("typo", isolation="inline")

        async def fetch_b(context):
            return "fetch_"  # as close to its own name as to fetch_a's

        async def fetch_a(context):
            return None

        agent.add_state("fetch_b", fetch_b)
        agent.add_state("fetch_a", fetch_a)
        with pytest.raises(UnknownNextStateError, match="did you mean 'fetch_a'"):
            await agent.run()

    @pytest.mark.parametrize("value", [42, {"a": 1}, ["ok", 3], b"x"])
    async def test_wrong_return_type(self, value):
        agent = Agent("bad", isolation="inline")

        async def first(context):
            return value

        agent.add_state("first", first)
        agent.add_state("ok", first)
        with pytest.raises(InvalidTransitionError, match="'first' returned"):
            await agent.run()


class TestConcurrencyLimits:
    """max_concurrent and a state's exclusivity with itself hold."""

    async def test_max_concurrent(self):
        inside = 0
        peak = 0
        agent = Agent("limited", isolation="inline", max_concurrent=2)

        async def start(context):
            return [f"w{i}" for i in range(6)]

        async def work(context):
            nonlocal inside, peak
            inside += 1
            peak = max(peak, inside)
            for _ in range(3):
                await asyncio.sleep(0)
            inside -= 1

        agent.add_state("start", start)
        for i in range(6):
            agent.add_state(f"w{i}", work)
        await agent.run()
        assert peak == 2
        assert all(agent.state_metadata[f"w{i}"].status is StateStatus.COMPLETED for i in range(6))

    async def test_priority_orders_the_queue(self):
        order: list[str] = []
        agent = Agent("prio", isolation="inline", max_concurrent=1)

        async def start(context):
            return ["low", "high", "normal"]

        async def work(context):
            order.append(context.state_name)

        agent.add_state("start", start)
        agent.add_state("low", work, priority=Priority.LOW)
        agent.add_state("normal", work)
        agent.add_state("high", work, resources=ResourceRequirements(cpu_units=0.1, priority=Priority.HIGH))
        await agent.run()
        assert order == ["high", "normal", "low"]

    async def test_pending_count_is_visible(self):
        seen = []
        agent = Agent("queue", isolation="inline", max_concurrent=1)

        async def start(context):
            return ["a", "b", "c"]

        async def work(context):
            seen.append((len(agent._running_states), len(agent.priority_queue)))

        agent.add_state("start", start)
        for n in "abc":
            agent.add_state(n, work)
        await agent.run()
        assert seen == [(1, 2), (1, 1), (1, 0)]

    async def test_pending_counts_what_waits_for_a_retry_or_a_resume(self):
        # The spec's "pending": a state waiting out its retry delay, or held by a pause, is
        # to run and not running, as a checkpoint's pending_states says.
        from agent import RetryPolicy

        agent = Agent("pending", isolation="inline")
        failed_once = asyncio.Event()

        async def flaky(context):
            if not failed_once.is_set():
                failed_once.set()
                raise RuntimeError("once")

        agent.add_state("flaky", flaky, retry_policy=RetryPolicy(max_retries=1, initial_delay=60.0, jitter=False))
        run = asyncio.ensure_future(agent.run())
        await failed_once.wait()
        while agent.state_metadata["flaky"].error is None:
            await asyncio.sleep(0)
        assert [a.state for a in agent.priority_queue] == ["flaky"] and not agent._running_states
        checkpoint = await agent.pause()
        assert [a.state for a in agent.priority_queue] == checkpoint.pending_states == ["flaky"]
        await agent.cancel_all()
        await run
        assert agent.priority_queue == []


class TestDynamic:
    """States may be added while the run goes, and returned afterwards."""

    async def test_state_added_while_running(self):
        agent = Agent("dyn", isolation="inline")

        async def spawner(context):
            async def late(ctx):
                ctx.set_state("late_ran", True)

            agent.add_state("late", late)
            return "late"

        agent.add_state("spawner", spawner)
        ctx = await agent.run()
        assert ctx.get_state("late_ran") is True

    async def test_closures_with_default_arguments(self):
        agent = Agent("chunks", isolation="inline")
        data_chunks = [[1, 2], [3], [4, 5, 6]]

        async def split(context):
            return [f"process_chunk_{i}" for i in range(len(data_chunks))]

        agent.add_state("split", split)
        for i, _chunk in enumerate(data_chunks):
            async def process_chunk(context, chunk_id=i):
                context.set_state(f"result_{chunk_id}", sum(data_chunks[chunk_id]))
                return "merge_results"

            agent.add_state(f"process_chunk_{i}", process_chunk, resources=ResourceRequirements(cpu_units=1.0))

        async def merge_results(context):
            context.set_state("total", sum(context.get_state(f"result_{i}") for i in range(3)))

        agent.add_state("merge_results", merge_results)
        ctx = await agent.run()
        assert ctx.get_state("total") == 21
        assert agent.state_metadata["merge_results"].runs == 1


class TestStatesThatCannotSuspend:
    """Which inline states the engine may step at once, without a task: exactly those whose
    code awaits nothing."""

    def test_read_from_the_code(self):
        import functools

        from agent.workflow import cannot_suspend

        async def returns(context):
            return "next" if context else None

        async def awaits(context):
            await asyncio.sleep(0)

        async def loops(context):
            async for _ in context:
                pass

        async def enters(context):
            async with context:
                pass

        async def comprehends(context):
            return [x async for x in context]

        def plain(context):
            return None

        assert cannot_suspend(returns)
        assert not any(cannot_suspend(f) for f in (awaits, loops, enters, comprehends, plain))
        assert not cannot_suspend(functools.partial(returns))  # not read through: it gets a task
