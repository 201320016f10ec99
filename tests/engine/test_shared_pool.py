"""Two agents sharing one pool may have states of the same name."""

from __future__ import annotations

import asyncio

from agent import Agent, ResourcePool, ResourceRequirements


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
