"""Waiting for a human lends the state's CPU to others and takes it back before going on."""

from __future__ import annotations

import asyncio

from agent import Agent, ResourcePool, ResourceRequirements, ResourceType
from agent.human import QueueInputProvider


class TestHumanWaitReservation:
    """A state blocked on a human does not keep other states from the CPU it reserved."""

    async def test_cpu_is_lent_during_the_wait(self):
        pool = ResourcePool(total_cpu=1, total_memory=1000, total_gpu=0)
        provider = QueueInputProvider()
        agent = Agent("review", isolation="inline", resource_pool=pool, human_input=provider)
        order: list[str] = []
        seen_during_wait: dict = {}

        async def start(context):
            return ["approval", "crunch"]

        async def approval(context):
            order.append("asking")
            answer = await context.human_in_the_loop(prompt="ok?", timeout=30)
            order.append(f"answered {answer}")
            context.set_state("cpu_after_answer", pool.get_state_allocations()["approval"].get(ResourceType.CPU))

        async def crunch(context):
            order.append("crunch runs")
            seen_during_wait.update(pool.get_state_allocations())

        need = ResourceRequirements(cpu_units=1, memory_mb=100, io_weight=0, network_weight=0)
        agent.add_state("start", start)
        agent.add_state("approval", approval, resources=need)
        agent.add_state("crunch", crunch, resources=need)

        async def human():
            request = await provider.wait_for_request()
            while "crunch runs" not in order:  # crunch needs the whole CPU: it runs only if it was lent
                await asyncio.sleep(0)
            provider.answer(request.id, "yes")

        ctx, _ = await asyncio.wait_for(asyncio.gather(agent.run(), human()), 10)
        assert order == ["asking", "crunch runs", "answered yes"]
        assert ResourceType.CPU not in seen_during_wait["approval"]  # memory stayed reserved
        assert seen_during_wait["approval"][ResourceType.MEMORY] == 100
        assert ctx.get_state("cpu_after_answer") == 1
        assert pool.get_state_allocations() == {}

    async def test_memory_stays_held_while_the_cpu_is_taken_back(self):
        # approval (1 CPU, 600 MB) asks; hog takes the CPU it lent; big (600 MB) waits for
        # memory. Answered while hog still runs, approval waits for its CPU holding its
        # memory: big does not start before approval has ended (it did: the whole holding
        # was given back and asked for again).
        pool = ResourcePool(total_cpu=1.5, total_memory=1000, total_gpu=0)
        provider = QueueInputProvider()
        agent = Agent("held", isolation="inline", resource_pool=pool, human_input=provider)
        order: list[str] = []
        hog_go = asyncio.Event()

        async def start(context):
            return ["approval", "hog", "big"]

        async def approval(context):
            await context.human_in_the_loop(prompt="ok?", timeout=30)
            order.append("approval answered")

        async def hog(context):
            order.append("hog runs")
            await hog_go.wait()

        async def big(context):
            order.append("big runs")

        def need(cpu: float, memory: float) -> ResourceRequirements:
            return ResourceRequirements(cpu_units=cpu, memory_mb=memory, io_weight=0, network_weight=0)

        agent.add_state("start", start)
        agent.add_state("approval", approval, resources=need(1, 600))
        agent.add_state("hog", hog, resources=need(1, 100))
        agent.add_state("big", big, resources=need(0.5, 600))

        async def human():
            request = await provider.wait_for_request()
            while "hog runs" not in order:
                await asyncio.sleep(0)
            provider.answer(request.id, "yes")
            while not pool._loans:  # approval waits to take its CPU back
                await asyncio.sleep(0)
            assert order == ["hog runs"]  # big did not take approval's memory
            assert pool.get_state_allocations()["approval"][ResourceType.MEMORY] == 600
            hog_go.set()

        await asyncio.wait_for(asyncio.gather(agent.run(), human()), 10)
        assert order == ["hog runs", "approval answered", "big runs"]
        assert pool.get_state_allocations() == {} and pool.queued() == []
