"""Two agents sharing one pool may have states of the same name."""

from __future__ import annotations

import asyncio

import pytest

from agent import Agent, AgentStatus, Priority, ResourcePool, ResourceRequirements, StateStatus
from agent import events as ev


class TestSharedPool:
    """Allocations of equal state names from different runs do not collide."""

    async def test_same_state_name_in_two_agents(self):
        pool = ResourcePool(total_cpu=4, total_memory=1024, total_gpu=0)
        both_in = asyncio.Event()
        inside = []

        def build(name: str) -> Agent:
            agent = Agent(name, isolation="inline", resource_pool=pool)

            async def work(context):
                inside.append(name)
                if len(inside) == 2:
                    both_in.set()
                await both_in.wait()
                context.set_state("held", sorted(pool.get_state_allocations()))

            agent.add_state("work", work, resources=ResourceRequirements(cpu_units=1, memory_mb=100))
            return agent

        first, second = build("first"), build("second")
        ctx1, ctx2 = await asyncio.wait_for(asyncio.gather(first.run(), second.run()), 10)
        held = max(ctx1.get_state("held"), ctx2.get_state("held"), key=len)  # read while both held
        assert len(held) == 2 and "work" in held
        assert pool.get_state_allocations() == {}


class TestGrantsWhileScheduling:
    """A grant that reaches a run while it schedules is launched, and a pause that gives
    back one queued request while the pool grants another still pauses."""

    async def test_a_grant_that_comes_back_mid_pass_is_launched(self):
        # B: x (NORMAL) -> j (NORMAL); A: a (LOW), queued behind x. When x ends the pool
        # grants a; B then queues j, which preempts a (granted, not started) and is
        # granted at once, while B is still scheduling. j was never started: both hung.
        need = ResourceRequirements(cpu_units=2.0, memory_mb=64)
        pool = ResourcePool(total_cpu=2.0, total_memory=1024, enable_preemption=True)
        a_queued, x_started = asyncio.Event(), asyncio.Event()

        async def x(context):
            x_started.set()
            await a_queued.wait()
            return "j"

        async def done(context):
            context.set_state("ran", True)

        b = Agent("B", resource_pool=pool, isolation="inline")
        b.add_state("x", x, resources=need, next_states=["j"])
        b.add_state("j", done, resources=need)
        a = Agent("A", resource_pool=pool, isolation="inline")
        a.add_state("a", done, resources=need, priority=Priority.LOW)
        a.add_observer(lambda e: a_queued.set() if e.kind == ev.STATE_QUEUED else None)
        b_run = asyncio.create_task(b.run())
        await x_started.wait()
        a_run = asyncio.create_task(a.run())
        b_context, a_context = await asyncio.wait_for(asyncio.gather(b_run, a_run), 30)
        assert b_context.get_state("ran") and a_context.get_state("ran")
        assert pool.get_state_allocations() == {} and pool.queued() == []

    async def test_a_pause_while_the_pool_grants_a_queued_request(self):
        # f -> [h, big, small]: h holds 1 of 2 CPUs, big (2 CPUs) and small queue behind it.
        # Pausing gives back big's request, which lets the pool grant small at once:
        # pause() raised KeyError and small started.
        pool = ResourcePool(total_cpu=2.0, total_memory=1024)
        queued, gate = asyncio.Event(), asyncio.Event()
        started: list[str] = []
        agent = Agent("pausing", resource_pool=pool, isolation="inline")

        async def f(context):
            return ["h", "big", "small"]

        async def h(context):
            await gate.wait()

        async def noop(context):
            return None

        def need(cpu: float) -> ResourceRequirements:
            return ResourceRequirements(cpu_units=cpu, memory_mb=64)

        agent.add_state("f", f)
        agent.add_state("h", h, resources=need(1.0))
        agent.add_state("big", noop, resources=need(2.0))
        agent.add_state("small", noop, resources=need(0.5))

        def observe(event: ev.RunEvent) -> None:
            if event.kind == ev.STATE_QUEUED and event.state == "small":
                queued.set()
            if event.kind == ev.STATE_STARTED:
                started.append(event.state)

        agent.add_observer(observe)
        run = asyncio.create_task(agent.run())
        await queued.wait()
        await agent.pause()
        assert agent.status is AgentStatus.PAUSED and started == ["f", "h"]
        gate.set()
        await agent.resume()
        await asyncio.wait_for(run, 10)
        assert agent.status is AgentStatus.COMPLETED and sorted(started) == ["big", "f", "h", "h", "small"]
        assert pool.get_state_allocations() == {}

    async def test_a_cancel_under_way_is_not_turned_into_a_preemption(self):
        # victim is cancelled and still stopping when a HIGH request preempts it: it ended
        # preempted, was requeued and ran again to completion.
        pool = ResourcePool(total_cpu=2.0, total_memory=1024, enable_preemption=True)
        started, stopping, let_go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        runs: list[int] = []

        async def victim(context):
            runs.append(1)
            if len(runs) > 1:
                return None
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopping.set()
                await let_go.wait()  # still stopping
                raise

        async def high(context):
            return None

        need = ResourceRequirements(cpu_units=2.0, memory_mb=64)
        low = Agent("low", resource_pool=pool, isolation="inline")
        low.add_state("victim", victim, resources=need, priority=Priority.LOW)
        urgent = Agent("urgent", resource_pool=pool, isolation="inline")
        urgent.add_state("high", high, resources=need, priority=Priority.HIGH)
        low_run = asyncio.create_task(low.run())
        await started.wait()
        assert low.cancel_state("victim")
        await stopping.wait()
        urgent_run = asyncio.create_task(urgent.run())
        while not pool.queued():
            await asyncio.sleep(0)
        let_go.set()
        await asyncio.wait_for(asyncio.gather(low_run, urgent_run), 10)
        assert low.state_metadata["victim"].status is StateStatus.CANCELLED and runs == [1]
        assert urgent.state_metadata["high"].status is StateStatus.COMPLETED

    async def test_a_request_that_could_not_preempt_when_it_came_does_once_its_equals_release(self):
        """HIGH h2 needs the whole pool; when it comes, HIGH h1 holds half (no victim) and
        NORMAL n1 the other half. When h1 releases, n1 is a victim that frees enough: h2
        must not wait behind it (priority inversion)."""
        pool = ResourcePool(total_cpu=4.0, total_memory=1024, enable_preemption=True)
        h1_go, n1_started, n1_preempted = asyncio.Event(), asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def h1(context):
            await h1_go.wait()
            order.append("h1")

        async def n1(context):
            if n1_started.is_set():  # its second run, after h2
                order.append("n1")
                return None
            n1_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                n1_preempted.set()
                raise

        async def h2(context):
            order.append("h2")

        half = ResourceRequirements(cpu_units=2.0, memory_mb=64)
        first = Agent("first", resource_pool=pool, isolation="inline")
        first.add_state("h1", h1, resources=half, priority=Priority.HIGH)
        normal = Agent("normal", resource_pool=pool, isolation="inline")
        normal.add_state("n1", n1, resources=half, priority=Priority.NORMAL)
        urgent = Agent("urgent", resource_pool=pool, isolation="inline")
        urgent.add_state("h2", h2, resources=ResourceRequirements(cpu_units=4.0, memory_mb=64),
                         priority=Priority.HIGH)
        runs = [asyncio.create_task(first.run()), asyncio.create_task(normal.run())]
        await n1_started.wait()
        runs.append(asyncio.create_task(urgent.run()))
        while not pool.queued():
            await asyncio.sleep(0)
        assert not n1_preempted.is_set()  # h1 is in the way, and of h2's own level
        h1_go.set()
        await asyncio.wait_for(asyncio.gather(*runs), 10)
        assert n1_preempted.is_set() and order == ["h1", "h2", "n1"]

    @pytest.mark.parametrize("ending", ["cancel_all", "pause"])
    async def test_a_run_withdrawing_its_requests_evicts_nothing_more_for_them(self, ending):
        """A run being cancelled or paused withdraws its queued requests one by one: none
        of them, about to go too, may evict other runs' states meanwhile."""
        pool = ResourcePool(total_cpu=4.0, total_memory=1024, enable_preemption=True)
        stopped: list[str] = []

        async def hold(context):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                stopped.append(context.state_name)
                raise

        async def fan(context):
            return ["l1", "l2", "l3", "l4"]

        low = Agent("low", resource_pool=pool, isolation="inline")
        low.add_state("fan", fan)
        for name in ("l1", "l2", "l3", "l4"):
            low.add_state(name, hold, resources=ResourceRequirements(cpu_units=1.0, memory_mb=16),
                          priority=Priority.LOW)

        async def go(context):
            return ["b1", "b2"]

        async def work(context):
            return None

        urgent = Agent("urgent", resource_pool=pool, isolation="inline")
        urgent.add_state("go", go)
        urgent.add_state("b1", work, resources=ResourceRequirements(cpu_units=2.0, memory_mb=16),
                         priority=Priority.HIGH)  # evicts two LOW states when it comes
        urgent.add_state("b2", work, resources=ResourceRequirements(cpu_units=4.0, memory_mb=16),
                         priority=Priority.HIGH)  # could evict the other two, once b1's room is there
        low_run = asyncio.create_task(low.run())
        while len(pool.get_state_allocations()) < 4:
            await asyncio.sleep(0)
        urgent_run = asyncio.create_task(urgent.run())
        while len(pool.queued()) < 2:
            await asyncio.sleep(0)
        chosen = set(pool.pending_evictions())
        assert len(chosen) == 2
        await (urgent.cancel_all() if ending == "cancel_all" else urgent.pause())
        assert set(pool.pending_evictions()) | set(stopped) <= chosen
        await low.cancel_all()
        await urgent.cancel_all()
        await asyncio.gather(low_run, urgent_run, return_exceptions=True)

    async def test_a_victim_granted_in_the_same_batch_as_a_state_that_releases_at_once(self):
        """Two states of a run are granted together; the first, which never awaits, ends
        and releases while the batch is being launched, and that release lets a waiting
        HIGH request evict the second, granted but not started: the run goes on."""
        pool = ResourcePool(total_cpu=4.0, total_memory=1024, enable_preemption=True)
        two = ResourceRequirements(cpu_units=2.0, memory_mb=16)
        whole = ResourceRequirements(cpu_units=4.0, memory_mb=16)
        go, later = asyncio.Event(), []

        async def h(context):
            return None

        high = Agent("high", resource_pool=pool, isolation="inline")
        high.add_state("h", h, resources=whole, priority=Priority.HIGH)

        async def start(context):
            return ["x", "y"]

        async def x(context):  # never awaits: it runs and releases as it is launched
            return None

        async def y(context):
            await asyncio.sleep(0)

        batch = Agent("batch", resource_pool=pool, isolation="inline")
        batch.add_state("start", start)
        batch.add_state("x", x, resources=two, priority=Priority.HIGH)
        batch.add_state("y", y, resources=two, priority=Priority.LOW)

        async def b(context):
            await go.wait()
            later.append(asyncio.create_task(high.run()))  # asks before x and y are launched

        blocker = Agent("blocker", resource_pool=pool, isolation="inline")
        blocker.add_state("b", b, resources=whole, priority=Priority.CRITICAL)
        blocker_run = asyncio.create_task(blocker.run())
        while not pool.get_state_allocations():
            await asyncio.sleep(0)
        batch_run = asyncio.create_task(batch.run())
        while len(pool.queued()) < 2:
            await asyncio.sleep(0)
        go.set()
        await asyncio.wait_for(asyncio.gather(blocker_run, batch_run), 10)
        await asyncio.wait_for(later[0], 10)
        assert batch.status is AgentStatus.COMPLETED and high.status is AgentStatus.COMPLETED

    async def test_a_release_on_another_threads_busy_loop_lets_a_request_here_preempt_at_once(self):
        """The request that may evict now waits on this loop; the release came on another
        thread's loop, which then blocks: the eviction is decided here, not after it."""
        import threading

        pool = ResourcePool(total_cpu=4.0, total_memory=1024, enable_preemption=True)
        half = ResourceRequirements(cpu_units=2.0, memory_mb=64)
        h1_go, h2_ran = threading.Event(), threading.Event()
        n1_started = asyncio.Event()

        async def h1(context):
            while not h1_go.is_set():
                await asyncio.sleep(0.01)

        async def busy(context):
            while not h1_go.is_set() or pool.holds("h1"):
                await asyncio.sleep(0)
            h2_ran.wait(30)  # blocks its loop: that loop's next turn comes only once h2 ran

        first = Agent("first", resource_pool=pool, isolation="inline")
        first.add_state("h1", h1, resources=half, priority=Priority.HIGH)
        first.add_state("busy", busy)
        elsewhere = threading.Thread(target=lambda: asyncio.run(first.run(start=["h1", "busy"])))

        async def n1(context):
            if n1_started.is_set():
                return None
            n1_started.set()
            await asyncio.Event().wait()

        async def h2(context):
            h2_ran.set()

        normal = Agent("normal", resource_pool=pool, isolation="inline")
        normal.add_state("n1", n1, resources=half, priority=Priority.NORMAL)
        urgent = Agent("urgent", resource_pool=pool, isolation="inline")
        urgent.add_state("h2", h2, resources=ResourceRequirements(cpu_units=4.0, memory_mb=64),
                         priority=Priority.HIGH)
        elsewhere.start()
        try:
            runs = [asyncio.create_task(normal.run())]
            await n1_started.wait()
            while not pool.holds("h1"):
                await asyncio.sleep(0.01)
            runs.append(asyncio.create_task(urgent.run()))
            while not pool.queued():
                await asyncio.sleep(0)
            h1_go.set()
            await asyncio.wait_for(asyncio.gather(*runs), 20)
            assert h2_ran.is_set()
        finally:
            h2_ran.set()
            elsewhere.join(30)
