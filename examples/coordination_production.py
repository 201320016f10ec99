"""Production patterns from the README: distributed workers and a shared resource pool.

Ten runs share one process: the SEMAPHORE of 10 on ``distributed_task`` and the QUOTA
on ``shared_resource`` hold across all of them (coordination is keyed by name and
shared by every agent of the process).

Run: python examples/coordination_production.py
"""

import asyncio

from agent import Context, StateResult
from agent.coordination import PrimitiveType, RateLimitStrategy, ResourceAllocation, create_coordinated_agent

peak = {"tasks": 0, "now": 0, "allocated": 0.0, "alloc_peak": 0.0}


async def process_chunk(chunk: int) -> int:
    await asyncio.sleep(0.01)
    return chunk * chunk


async def process_distributed(context: Context) -> StateResult:
    # Coordinated processing across workers
    peak["now"] += 1
    peak["tasks"] = max(peak["tasks"], peak["now"])
    try:
        chunk_id = context.get_state("chunk")
        results = await process_chunk(chunk_id)
        context.set_state(f"results_{chunk_id}", results)
    finally:
        peak["now"] -= 1
    return "use_resource"


async def use_resource(context: Context) -> StateResult:
    # Get resource allocation
    allocation = 10.0
    async with ResourceAllocation("shared_resource", allocation):
        peak["allocated"] += allocation
        peak["alloc_peak"] = max(peak["alloc_peak"], peak["allocated"])
        await asyncio.sleep(0.01)  # Use resource...
        peak["allocated"] -= allocation
    return None


def build(worker: int):
    agent = create_coordinated_agent(f"worker_{worker}", isolation="inline")
    # Coordinate distributed workers
    agent.add_state_coordination("distributed_task", PrimitiveType.SEMAPHORE, max_count=10, ttl=3600.0)
    agent.add_state_rate_limit(
        "distributed_task", max_rate=100.0, strategy=RateLimitStrategy.SLIDING_WINDOW, window_size=60.0
    )
    # Manage shared resource pool
    agent.add_state_coordination("shared_resource", PrimitiveType.QUOTA, quota_limit=100.0, ttl=60.0)
    agent.add_state("distributed_task", process_distributed)
    agent.add_state("use_resource", use_resource)
    return agent


async def main() -> None:
    agents = [build(i) for i in range(30)]
    contexts = await asyncio.gather(*(a.run(initial_context={"chunk": i}) for i, a in enumerate(agents)))
    print("results:", [c.get_state(f"results_{i}") for i, c in enumerate(contexts)][:10], "...")
    print("most distributed_task at once:", peak["tasks"], "(limit 10)")
    print("most shared_resource drawn at once:", peak["alloc_peak"], "(limit 100.0)")


if __name__ == "__main__":
    asyncio.run(main())
