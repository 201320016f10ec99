"""A state waiting for a human lends its CPU (lend_cpu) and takes it back (take_cpu_back):
the rest of its holding stays held throughout, and the books stay right."""

from __future__ import annotations

import asyncio

from agent.resources import Priority, ResourcePool, ResourceType

from .helpers import FakeClock, req


class TestLending:
    async def test_taking_it_back_goes_ahead_of_a_request_waiting_for_its_memory(self):
        # V (LOW) lends its CPU; P (HIGH) queues for CPU and V's memory. V must get its CPU
        # back first, or P waits for V and V for the CPU set aside for P (it hung).
        pool = ResourcePool(total_cpu=2, total_memory=100, total_gpu=0)
        assert pool.try_acquire("V", req(2, 100, priority=Priority.LOW))
        assert pool.lend_cpu("V")
        pool.enqueue("P", req(2, 100, priority=Priority.HIGH))
        await asyncio.wait_for(pool.take_cpu_back("V"), 10)
        assert pool.get_state_allocations()["V"] == {ResourceType.CPU: 2, ResourceType.MEMORY: 100}
        pool.release("V")
        assert pool.grant_next() == ["P"]

    async def test_it_waits_while_the_cpu_is_in_use(self):
        pool = ResourcePool(total_cpu=2, total_memory=1000, total_gpu=0)
        assert pool.try_acquire("V", req(2, 100))
        assert pool.lend_cpu("V")
        assert pool.try_acquire("other", req(2, 100))
        back = asyncio.create_task(pool.take_cpu_back("V"))
        await asyncio.sleep(0)
        assert not back.done() and pool.get_state_allocations()["V"] == {ResourceType.MEMORY: 100}
        pool.release("other")
        await asyncio.wait_for(back, 10)
        assert pool.get_state_allocations()["V"][ResourceType.CPU] == 2

    async def test_a_requeued_lender_does_not_get_its_cpu_twice(self):
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_gpu=0, enable_preemption=True)
        assert pool.try_acquire("A", req(2, 100))
        assert pool.lend_cpu("A")
        pool.requeue("A")  # preempted while waiting: it asks again for all of it
        assert pool.grant_next() == ["A"]
        await asyncio.wait_for(pool.take_cpu_back("A"), 10)  # nothing left to take back
        assert pool.get_state_allocations()["A"][ResourceType.CPU] == 2
        assert pool.available(ResourceType.CPU) == 2

    def test_what_was_held_before_the_loan_counts_in_the_usage(self):
        clock = FakeClock()
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_gpu=0, clock=clock)
        assert pool.try_acquire("A", req(2, 100))
        clock.now = 10.0
        assert pool.lend_cpu("A")
        clock.now = 20.0
        pool.release("A")  # its attempt ended while it waited for a human
        assert pool.get_usage_stats()[ResourceType.CPU].average_usage == 1.0  # 2 CPUs for 10 of 20 s

    def test_nothing_to_lend(self):
        pool = ResourcePool(total_cpu=4, total_memory=1000, total_gpu=0)
        assert pool.try_acquire("memory_only", req(0, 100))
        assert not pool.lend_cpu("memory_only") and not pool.lend_cpu("nobody")


class TestLendingBetweenRuns:
    async def test_an_answered_state_gets_its_cpu_back_when_another_runs_state_ends(self):
        # The borrower's end goes through the engine's admission (nothing queued): the
        # answered state waited for its CPU for ever, with the whole pool free.
        from agent import Agent
        from agent.human import QueueInputProvider

        pool = ResourcePool(total_cpu=1, total_memory=1000, total_gpu=0)
        provider = QueueInputProvider()
        asker = Agent("asker", isolation="inline", resource_pool=pool, human_input=provider)
        borrower = Agent("borrower", isolation="inline", resource_pool=pool)
        started, gate = asyncio.Event(), asyncio.Event()

        async def ask(context):
            context.set_state("answer", await context.human_in_the_loop("ok?", timeout=60))

        async def borrow(context):
            started.set()
            await gate.wait()

        asker.add_state("ask", ask, resources=req(1, 10))
        borrower.add_state("borrow", borrow, resources=req(1, 10))
        asking = asyncio.create_task(asker.run())
        question = await provider.wait_for_request()  # its CPU is lent
        borrowing = asyncio.create_task(borrower.run())
        await started.wait()
        provider.answer(question.id, "yes")  # it waits for its CPU back
        while "ask" not in pool._loans:
            await asyncio.sleep(0)
        gate.set()
        await borrowing
        assert (await asyncio.wait_for(asking, 10)).get_state("answer") == "yes"
        assert pool.available(ResourceType.CPU) == 1
