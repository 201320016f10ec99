"""Agents sharing one pool wait in its one queue: wake-ups, priority, backfill, preemption, no stale entries."""

from __future__ import annotations

import asyncio

import pytest

from agent import Agent, AgentStatus, Priority, ResourcePool, ResourceRequirements, ResourceType, StateStatus
from agent.devices import GPUDevice, StaticInventory


def need(cpu: float, priority: Priority = Priority.NORMAL, gpu: float = 0.0) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=cpu, memory_mb=10, io_weight=0, network_weight=0, gpu_units=gpu,
                                priority=priority)


def one_state(name: str, pool: ResourcePool, req: ResourceRequirements, body, isolation: str = "inline") -> Agent:
    agent = Agent(name, isolation=isolation, resource_pool=pool)
    agent.add_state("work", body, resources=req)
    return agent


def assert_pool_empty(pool: ResourcePool) -> None:
    stats = pool.statistics()
    assert stats.holders == 0 and stats.waiting == 0
    assert pool.get_waiting_states() == {} and pool.get_state_allocations() == {}
    assert all(v == 0 for v in stats.allocated.values())


class TestWakeUp:
    """A run waiting for resources starts when another agent releases them."""

    async def test_second_agent_runs_after_the_first_releases(self) -> None:
        pool = ResourcePool(total_cpu=1, total_memory=100, total_gpu=0)
        holding, release = asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def first(context):
            order.append("first")
            holding.set()
            await release.wait()

        async def second(context):
            order.append("second")

        a = one_state("a", pool, need(1), first)
        b = one_state("b", pool, need(1), second)
        run_a = asyncio.create_task(a.run())
        await holding.wait()
        run_b = asyncio.create_task(b.run())
        while not pool.get_waiting_states():
            await asyncio.sleep(0)
        assert b.state_metadata["work"].waiting_for.startswith("resources:")
        assert pool.statistics().waiting == 1
        release.set()
        await asyncio.wait_for(asyncio.gather(run_a, run_b), 10)
        assert order == ["first", "second"]
        assert_pool_empty(pool)

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_twenty_agents_on_one_pool_all_complete(self, isolation: str) -> None:
        pool = ResourcePool(total_cpu=2, total_memory=1000, total_gpu=0)
        done: list[str] = []

        def build(i: int) -> Agent:
            agent = Agent(f"agent{i}", isolation=isolation, resource_pool=pool)

            async def step(context):
                context.set_state("i", i)
                return "finish"

            async def finish(context):
                return None

            agent.add_state("step", step, resources=need(1))
            agent.add_state("finish", finish, resources=need(1))
            return agent

        agents = [build(i) for i in range(20)]
        results = await asyncio.wait_for(asyncio.gather(*(a.run() for a in agents)), 120)
        for i, (agent, ctx) in enumerate(zip(agents, results)):
            assert agent.status is AgentStatus.COMPLETED and ctx.get_state("i") == i
            done.append(agent.name)
        assert len(done) == 20
        assert pool.statistics().granted == 40
        assert_pool_empty(pool)


class TestPriorityAcrossAgents:
    """Waiting requests of different agents start by priority, first come first served within one."""

    async def test_grant_order_is_by_priority_then_arrival(self) -> None:
        pool = ResourcePool(total_cpu=1, total_memory=100, total_gpu=0)
        holding, release = asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def blocker(context):
            holding.set()
            await release.wait()

        def recorder(name: str):
            async def record(context):
                order.append(name)

            return record

        first = one_state("blocker", pool, need(1), blocker)
        runs = [asyncio.create_task(first.run())]
        await holding.wait()
        queued = [("low", Priority.LOW), ("normal_1", Priority.NORMAL), ("high", Priority.HIGH),
                  ("normal_2", Priority.NORMAL), ("critical", Priority.CRITICAL)]
        for name, priority in queued:
            agent = one_state(name, pool, need(1, priority), recorder(name))
            runs.append(asyncio.create_task(agent.run()))
            while len(pool.get_waiting_states()) < len(runs) - 1:
                await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(asyncio.gather(*runs), 10)
        assert order == ["critical", "high", "normal_1", "normal_2", "low"]
        assert_pool_empty(pool)

    async def test_backfill_behind_a_gpu_blocked_state(self) -> None:
        gpu = GPUDevice(0, "GPU-0000", "Test GPU", 1024, "", 0)
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_gpu=1, gpu_inventory=StaticInventory([gpu]))
        holding, release = asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def gpu_holder(context):
            holding.set()
            await release.wait()
            order.append("gpu_holder")

        async def high_gpu(context):
            order.append("high_gpu")

        async def low_cpu(context):
            order.append("low_cpu")
            release.set()

        holder = one_state("holder", pool, need(1, Priority.LOW, gpu=1), gpu_holder)
        runs = [asyncio.create_task(holder.run())]
        await holding.wait()
        runs.append(asyncio.create_task(one_state("high", pool, need(1, Priority.HIGH, gpu=1), high_gpu).run()))
        while not pool.get_waiting_states():
            await asyncio.sleep(0)
        runs.append(asyncio.create_task(one_state("low", pool, need(1, Priority.LOW), low_cpu).run()))
        await asyncio.wait_for(asyncio.gather(*runs), 10)
        # The LOW CPU-only state used what the GPU-blocked HIGH one left; HIGH ran after the GPU came back.
        assert order == ["low_cpu", "gpu_holder", "high_gpu"]
        assert_pool_empty(pool)


class TestPreemptionAcrossAgents:
    """A CRITICAL state of one agent evicts a LOW state of another, which resumes afterwards."""

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_critical_evicts_low_of_another_agent(self, isolation: str, tmp_path) -> None:
        pool = ResourcePool(total_cpu=2, total_memory=1000, total_gpu=0, enable_preemption=True)
        marker = tmp_path / "low_started"

        async def low_work(context):
            import os
            import time

            context.set_state("progress", context.get_state("progress", 0) + 1)
            if context.get_state("progress") == 1:
                open(marker, "w").close()
                while True:  # runs until evicted
                    time.sleep(0.01) if os.getpid() != context.get_state("parent") else await asyncio.sleep(0.01)
            return None

        async def urgent(context):
            context.set_state("ran", True)

        low = Agent("low", isolation=isolation, resource_pool=pool)
        low.add_state("work", low_work, resources=need(2, Priority.LOW))
        high = Agent("high", isolation=isolation, resource_pool=pool)
        high.add_state("urgent", urgent, resources=need(2, Priority.CRITICAL))
        import os

        low_run = asyncio.create_task(low.run(initial_context={"parent": os.getpid()}))
        while not marker.exists():
            await asyncio.sleep(0.01)
        ctx = await asyncio.wait_for(high.run(), 30)
        assert ctx.get_state("ran") is True
        low_ctx = await asyncio.wait_for(low_run, 30)
        assert low_ctx.get_state("progress") == 2  # restarted and saw its own earlier progress
        meta = low.state_metadata["work"]
        assert meta.preemptions == 1 and meta.attempts == 1 and meta.status is StateStatus.COMPLETED
        assert pool.statistics().preempted == 1
        assert_pool_empty(pool)


class TestNoStaleEntries:
    """Cancelling a run that waits in the queue leaves nothing behind in the pool."""

    async def test_cancel_all_and_cancel_state_withdraw_queued_requests(self) -> None:
        pool = ResourcePool(total_cpu=1, total_memory=100, total_gpu=0)
        holding, release = asyncio.Event(), asyncio.Event()

        async def blocker(context):
            holding.set()
            await release.wait()

        async def never(context):
            raise AssertionError("must not run")

        first = one_state("first", pool, need(1), blocker)
        run_first = asyncio.create_task(first.run())
        await holding.wait()
        waiting = Agent("waiting", isolation="inline", resource_pool=pool)

        async def start(context):
            return ["w1", "w2"]

        waiting.add_state("start", start)
        waiting.add_state("w1", never, resources=need(1))
        waiting.add_state("w2", never, resources=need(1))
        run_waiting = asyncio.create_task(waiting.run())
        while len(pool.get_waiting_states()) < 2:
            await asyncio.sleep(0)
        assert waiting.cancel_state("w1")
        assert set(pool.get_waiting_states()) == {"w2"}
        await waiting.cancel_all()
        await run_waiting
        assert pool.get_waiting_states() == {} and pool.statistics().waiting == 0
        assert waiting.status is AgentStatus.CANCELLED
        release.set()
        await run_first
        assert_pool_empty(pool)

    async def test_the_default_pool_is_shared_by_agents_without_one(self) -> None:
        a, b = Agent("a"), Agent("b")
        assert a.resource_pool is b.resource_pool
        assert a.resource_pool.totals[ResourceType.CPU] >= 1

    def test_agents_first_run_on_several_threads_share_one_default_pool(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each thread that asked first made a "process-wide" pool of its own, each handing
        out the whole machine: a service built from a thread pool over-committed for good.
        (NVML's start, the window, is made as slow here as a real driver can be.)"""
        import threading
        import time

        from agent import devices, resources

        monkeypatch.delenv("AGENT_GPUS", raising=False)
        monkeypatch.setattr(resources, "_default", None)
        monkeypatch.setattr(devices, "_nvml", None)
        real = devices.NvmlInventory

        def slow_nvml() -> devices.NvmlInventory:
            time.sleep(0.05)
            return real()

        monkeypatch.setattr(devices, "NvmlInventory", slow_nvml)
        start = threading.Barrier(8)
        pools: list[ResourcePool] = []

        def first_use(i: int) -> None:
            start.wait()
            pools.append(Agent(f"t{i}").resource_pool)

        threads = [threading.Thread(target=first_use, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(pools) == 8 and all(pool is pools[0] for pool in pools)
        assert Agent("later").resource_pool is pools[0]
