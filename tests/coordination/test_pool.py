"""Coordination beside a shared resource pool: a state waiting for its primitive holds no
part of the pool, so states that can run use it, and nothing is preempted for a wait."""

from __future__ import annotations

import asyncio

from agent import Agent, Priority, ResourcePool, ResourceRequirements
from agent.coordination import PrimitiveType, create_coordinated_agent
from agent.coordination.coordinator import Coordinator


def one_cpu(priority: Priority = Priority.NORMAL) -> ResourceRequirements:
    return ResourceRequirements(cpu_units=1.0, memory_mb=64, io_weight=0, network_weight=0, priority=priority)


def guarded(name: str, pool: ResourcePool, coord: Coordinator, gate: asyncio.Event, inside: list[str],
            priority: Priority = Priority.NORMAL) -> Agent:
    """An agent whose one state holds the MUTEX 'ledger_write' until ``gate`` is set."""
    agent = create_coordinated_agent(name, isolation="inline", resource_pool=pool, coordinator=coord)
    agent.add_state_coordination("ledger_write", PrimitiveType.MUTEX)

    async def ledger_write(context):
        inside.append(name)
        await gate.wait()

    agent.add_state("ledger_write", ledger_write, resources=one_cpu(priority))
    return agent


def plain(name: str, pool: ResourcePool, gate: asyncio.Event, inside: list[str], priority: Priority) -> Agent:
    agent = Agent(name, isolation="inline", resource_pool=pool)

    async def other(context):
        inside.append(name)
        await gate.wait()

    agent.add_state("other", other, resources=one_cpu(priority))
    return agent


async def until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def test_a_state_waiting_for_its_mutex_leaves_its_cores_to_others() -> None:
    pool = ResourcePool(total_cpu=2, total_memory=1000, total_io=10, total_network=10, total_gpu=0)
    coord = Coordinator()
    inside: list[str] = []
    holder_done, free = asyncio.Event(), asyncio.Event()
    free.set()
    holder = guarded("holder", pool, coord, holder_done, inside)
    waiter = guarded("waiter", pool, coord, free, inside)
    runs: list[asyncio.Future] = []
    try:
        runs.append(first := asyncio.ensure_future(holder.run()))
        await until(lambda: inside == ["holder"])
        runs.append(second := asyncio.ensure_future(waiter.run()))
        meta = waiter.state_metadata["ledger_write"]
        await until(lambda: (meta.waiting_for or "").startswith("coordination: MUTEX"))
        assert len(pool.get_state_allocations()) == 1  # the holder's: the waiter holds nothing
        # One core is free while the waiter waits: a state of another agent runs on it now.
        other = plain("other", pool, free, inside, Priority.NORMAL)
        await asyncio.wait_for(other.run(), 10)
        assert inside == ["holder", "other"]
        holder_done.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert inside == ["holder", "other", "waiter"]
        assert pool.get_state_allocations() == {}
    finally:
        await stop(runs, coord)


async def test_a_high_state_waiting_for_its_mutex_preempts_nothing() -> None:
    pool = ResourcePool(total_cpu=2, total_memory=1000, total_io=10, total_network=10, total_gpu=0,
                        enable_preemption=True)
    coord = Coordinator()
    inside: list[str] = []
    holder_done, low_done, free = asyncio.Event(), asyncio.Event(), asyncio.Event()
    free.set()
    holder = guarded("holder", pool, coord, holder_done, inside, Priority.LOW)
    low = plain("low", pool, low_done, inside, Priority.LOW)
    high = guarded("high", pool, coord, free, inside, Priority.HIGH)
    runs: list[asyncio.Future] = []
    try:
        runs.append(asyncio.ensure_future(holder.run()))
        await until(lambda: inside == ["holder"])
        runs.append(asyncio.ensure_future(low.run()))
        await until(lambda: inside == ["holder", "low"])
        runs.append(asyncio.ensure_future(high.run()))
        meta = high.state_metadata["ledger_write"]
        await until(lambda: (meta.waiting_for or "").startswith("coordination: MUTEX"))
        # Evicting "low" would give "high" a core it cannot use before the mutex is free.
        assert pool.statistics().preempted == 0 and low.state_metadata["other"].preemptions == 0
        holder_done.set()  # the mutex and the holder's core go to "high"
        await asyncio.wait_for(runs[2], 10)
        low_done.set()
        await asyncio.wait_for(asyncio.gather(*runs), 10)
        assert inside == ["holder", "low", "high"]  # "low" ran once, never evicted
        assert low.state_metadata["other"].preemptions == 0
    finally:
        await stop(runs, coord)


async def test_a_state_waiting_for_its_rate_limit_leaves_its_core_to_others() -> None:
    pool = ResourcePool(total_cpu=1, total_memory=1000, total_io=10, total_network=10, total_gpu=0)
    coord = Coordinator()
    inside: list[str] = []
    free = asyncio.Event()
    free.set()
    limited = create_coordinated_agent("limited", isolation="inline", resource_pool=pool, coordinator=coord)
    limited.add_state_rate_limit("fetch", max_rate=0.5, strategy="leaky_bucket")  # one start per 2 s

    async def fetch(context):
        inside.append("fetch")
        return "fetch" if inside.count("fetch") < 2 else None

    limited.add_state("fetch", fetch, resources=one_cpu())
    runs: list[asyncio.Future] = []
    try:
        runs.append(asyncio.ensure_future(limited.run()))
        meta = limited.state_metadata["fetch"]
        await until(lambda: inside == ["fetch"] and (meta.waiting_for or "").startswith("rate limit"))
        assert pool.get_state_allocations() == {}  # waiting for its next start, it holds no core
        other = plain("other", pool, free, inside, Priority.NORMAL)
        await asyncio.wait_for(other.run(), 10)  # runs on the only core meanwhile
        await asyncio.wait_for(runs[0], 10)
        assert inside == ["fetch", "other", "fetch"]
    finally:
        await stop(runs, coord)


async def stop(runs: list[asyncio.Future], coord: Coordinator) -> None:
    """Whatever an assertion left running (a failed test must not hang the next one)."""
    for run in runs:
        run.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    await coord.aclose()
