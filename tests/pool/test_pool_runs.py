"""The pool inside real runs: preemption of lower-priority states, quotas in both modes."""

from __future__ import annotations

import asyncio

import pytest

from agent import (
    Agent,
    AgentStatus,
    Priority,
    QuotaExceededError,
    ResourcePool,
    ResourceRequirements,
    RunTimeoutError,
    StateStatus,
)
from agent import events as ev
from agent.executor import admission_held_up


def whole_pool() -> ResourcePool:
    return ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                        enable_preemption=True)


def need(cpu: float, priority: Priority) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=cpu, memory_mb=cpu * 250, io_weight=0, network_weight=0, priority=priority)


class TestInlinePreemption:
    """Inline victims are cancelled, requeued, restarted after the HIGH state, and complete."""

    async def test_high_evicts_two_low_states(self) -> None:
        started = {"low_a": asyncio.Event(), "low_b": asyncio.Event()}
        log: list[str] = []
        events: list[ev.RunEvent] = []
        agent = Agent("preempt", isolation="inline", resource_pool=whole_pool())
        agent.add_observer(events.append)

        async def start(context):  # noqa: ANN001, ANN202
            return ["low_a", "low_b", "trigger"]

        async def low_a(context):  # noqa: ANN001, ANN202
            done = context.get_state("a_rows", 0)
            log.append(f"low_a starts at {done}")
            if done == 0:
                context.set_state("a_rows", 500)  # progress kept across the eviction
                started["low_a"].set()
                await asyncio.Event().wait()  # runs until preempted
            context.set_state("a_rows", 1000)
            log.append("low_a done")

        async def low_b(context):  # noqa: ANN001, ANN202
            log.append("low_b starts")
            if context.get_state("b_started") is None:
                context.set_state("b_started", True)
                started["low_b"].set()
                await asyncio.Event().wait()
            log.append("low_b done")

        async def trigger(context):  # noqa: ANN001, ANN202
            await started["low_a"].wait()
            await started["low_b"].wait()
            return ["high"]  # a fan-out of one starts now (a plain name would join after the lows)

        async def high(context):  # noqa: ANN001, ANN202
            log.append("high runs")
            assert agent.resource_pool.get_state_allocations().keys() == {"high"}

        agent.add_state("start", start)
        agent.add_state("low_a", low_a, resources=need(2, Priority.LOW))
        agent.add_state("low_b", low_b, resources=need(2, Priority.LOW))
        agent.add_state("trigger", trigger)
        agent.add_state("high", high, resources=need(4, Priority.HIGH))
        await agent.run(timeout=30)

        assert log.index("high runs") < log.index("low_a done")
        assert log.index("high runs") < log.index("low_b done")
        assert "low_a starts at 500" in log  # resumed from its own progress
        assert agent.context.get_state("a_rows") == 1000
        for name in ("low_a", "low_b"):
            meta = agent.state_metadata[name]
            assert meta.preemptions == 1
            assert meta.status is StateStatus.COMPLETED
            assert meta.attempts == 1  # a preemption is not a failed attempt
        assert agent.state_metadata["high"].preemptions == 0
        preempted = sorted(e.state for e in events if e.kind == ev.STATE_PREEMPTED)
        assert preempted == ["low_a", "low_b"]
        for name in ("low_a", "low_b"):  # each waited in the queue again, and observers heard so
            mine = [e for e in events if e.state == name and e.kind != ev.STATE_COMPLETED]
            at = [e.kind for e in mine].index(ev.STATE_PREEMPTED)
            assert [e.kind for e in mine[at:]] == [ev.STATE_PREEMPTED, ev.STATE_QUEUED, ev.STATE_STARTED]
            assert mine[at + 1].data["waiting_for"] == "resources: requeued after a preemption"
        stats = agent.resource_pool.statistics()
        assert stats.holders == 0 and stats.evicting == 0 and stats.preempted == 2

    async def test_same_priority_is_never_evicted(self) -> None:
        started = asyncio.Event()
        order: list[str] = []
        agent = Agent("no-preempt", isolation="inline", resource_pool=whole_pool())
        gate = asyncio.Event()

        async def start(context):  # noqa: ANN001, ANN202
            return ["holder", "trigger"]

        async def holder(context):  # noqa: ANN001, ANN202
            started.set()
            await gate.wait()
            order.append("holder done")

        async def trigger(context):  # noqa: ANN001, ANN202
            await started.wait()
            return ["other"]

        async def other(context):  # noqa: ANN001, ANN202
            order.append("other runs")

        agent.add_state("start", start)
        agent.add_state("holder", holder, resources=need(4, Priority.NORMAL))
        agent.add_state("trigger", trigger)
        agent.add_state("other", other, resources=need(4, Priority.NORMAL))
        queued = asyncio.Event()
        agent.add_observer(lambda e: queued.set() if e.kind == ev.STATE_QUEUED and e.state == "other" else None)
        run = asyncio.create_task(agent.run(timeout=30))
        await queued.wait()  # "other" asked, found no room, and evicted nobody
        assert "other" in agent.resource_pool.get_waiting_states()
        gate.set()
        await run
        assert order == ["holder done", "other runs"]
        assert agent.state_metadata["holder"].preemptions == 0


class TestQuotasInRuns:
    """A run waits for a wait-mode quota and fails cleanly on a fail-mode one."""

    def agent(self, mode: str) -> tuple[Agent, list[str]]:
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                            enable_quotas=True)
        pool.set_priority_quota(Priority.LOW, cpu=1, mode=mode)
        agent = Agent(f"quota-{mode}", isolation="inline", resource_pool=pool)
        log: list[str] = []

        async def start(context):  # noqa: ANN001, ANN202
            return ["x", "y"]

        def worker(name: str):  # noqa: ANN202
            async def state(context):  # noqa: ANN001, ANN202
                log.append(f"{name} starts")
                await asyncio.sleep(0)  # give the other branch its chance to ask for room
                log.append(f"{name} ends")

            return state

        agent.add_state("start", start)
        for name in ("x", "y"):
            agent.add_state(name, worker(name), resources=need(1, Priority.LOW))
        return agent, log

    async def test_wait_mode_serialises(self) -> None:
        agent, log = self.agent("wait")
        await agent.run(timeout=30)
        assert log == ["x starts", "x ends", "y starts", "y ends"]

    async def test_fail_mode_fails_the_run(self) -> None:
        agent, log = self.agent("fail")
        with pytest.raises(QuotaExceededError, match=r"quota of priority LOW is 1 \(1 in use\)"):
            await agent.run(timeout=30)
        assert agent.status is AgentStatus.FAILED
        assert agent.state_metadata["y"].status is StateStatus.BLOCKED
        assert "set_priority_quota" in agent.state_metadata["y"].blocked_reason
        assert agent.resource_pool.statistics().holders == 0


    async def test_fail_mode_lets_an_admitted_state_take_its_grant_again(self) -> None:
        """An attempt gives its grant back while an admission hook holds it up; a state of
        another run takes the quota meanwhile. The quota was checked when the first asked:
        it now waits for its grant again, as a request queued for capacity does, and runs."""
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                            enable_quotas=True)
        pool.set_quota("embed", cpu=1, mode="fail")
        held_up, let_in, second_runs, second_may_end = (asyncio.Event() for _ in range(4))
        log: list[str] = []

        class Gate:
            async def acquire(self, state, run_id, attempt):  # noqa: ANN001, ANN202
                admission_held_up()  # its grant goes back to the pool meanwhile
                held_up.set()
                await let_in.wait()

            async def release(self, state, run_id, attempt, ok):  # noqa: ANN001, ANN202
                pass

        def embed(name: str, started: asyncio.Event | None = None):  # noqa: ANN202
            async def state(context):  # noqa: ANN001, ANN202
                log.append(f"{name} starts")
                if started is not None:
                    started.set()
                    await second_may_end.wait()  # holding the quota while the first asks again
                log.append(f"{name} ends")

            return state

        first = Agent("first", isolation="inline", resource_pool=pool)
        first.add_admission_hook(Gate())
        first.add_state("embed", embed("first"), resources=need(1, Priority.NORMAL))
        second = Agent("second", isolation="inline", resource_pool=pool)
        second.add_state("embed", embed("second", second_runs), resources=need(1, Priority.NORMAL))
        running = asyncio.ensure_future(first.run(timeout=30))
        await held_up.wait()
        other = asyncio.ensure_future(second.run(timeout=30))
        await second_runs.wait()
        let_in.set()
        for _ in range(1000):  # the first asks for its grant again, and waits for it (or fails)
            if pool.queued() or running.done():
                break
            await asyncio.sleep(0)
        second_may_end.set()
        await asyncio.gather(running, other)
        assert first.state_metadata["embed"].status is StateStatus.COMPLETED
        assert log == ["second starts", "second ends", "first starts", "first ends"]
        assert pool.statistics().holders == 0


class TestWaitingFor:
    """A state that leaves the pool's queue without running stops saying it waits for resources."""

    @staticmethod
    def queued_agent(pool: ResourcePool, name: str) -> tuple[Agent, asyncio.Event]:
        agent = Agent(name, isolation="inline", resource_pool=pool)

        async def wanted(context):  # noqa: ANN001, ANN202
            return None

        agent.add_state("wanted", wanted, resources=need(4, Priority.NORMAL))
        queued = asyncio.Event()
        agent.add_observer(lambda e: queued.set() if e.kind == ev.STATE_QUEUED else None)
        return agent, queued

    @staticmethod
    def held_pool() -> ResourcePool:
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_io=10, total_network=10, total_gpu=0)
        assert pool.try_acquire("holder", need(4, Priority.NORMAL))
        return pool

    async def queued_run(self, pool: ResourcePool, name: str) -> tuple[Agent, asyncio.Task]:
        """An agent's run, once its state waits in ``pool``'s queue."""
        agent, queued = self.queued_agent(pool, name)
        run = asyncio.create_task(agent.run())
        await queued.wait()
        return agent, run

    async def test_cancelled_timed_out_and_paused_while_queued(self) -> None:
        pool = self.held_pool()
        cancelled, run = await self.queued_run(pool, "cancelled_while_queued")
        assert cancelled.state_metadata["wanted"].waiting_for.startswith("resources: ")
        assert cancelled.cancel_state("wanted")
        await run
        meta = cancelled.state_metadata["wanted"]
        assert (meta.status, meta.waiting_for, pool.get_waiting_states()) == (StateStatus.CANCELLED, None, {})

        timed_out, _ = self.queued_agent(pool, "timed_out_while_queued")
        with pytest.raises(RunTimeoutError):
            await timed_out.run(timeout=0.05)
        meta = timed_out.state_metadata["wanted"]
        assert (meta.status, meta.waiting_for, pool.get_waiting_states()) == (StateStatus.CANCELLED, None, {})

        paused, run = await self.queued_run(pool, "paused_while_queued")
        await paused.pause()
        assert paused.state_metadata["wanted"].waiting_for == "the run to resume: it is paused"
        assert pool.get_waiting_states() == {}
        pool.release("holder")
        await paused.resume()
        await run
        meta = paused.state_metadata["wanted"]
        assert (meta.status, meta.waiting_for) == (StateStatus.COMPLETED, None)

    async def test_granted_then_paused_before_it_started(self) -> None:
        pool = self.held_pool()
        agent, run = await self.queued_run(pool, "granted_then_paused")
        pool.release("holder")  # the grant comes; it is launched on the run's next pass ...
        await agent.pause()  # ... but the run is paused first
        meta = agent.state_metadata["wanted"]
        for _ in range(100):  # the run's next pass gives the grant back
            if pool.statistics().holders == 0:
                break
            await asyncio.sleep(0)
        assert (meta.status, meta.waiting_for) == (StateStatus.READY, "the run to resume: it is paused")
        assert pool.get_waiting_states() == {} and pool.statistics().holders == 0
        await agent.resume()
        await run
        assert (meta.status, meta.waiting_for) == (StateStatus.COMPLETED, None)
