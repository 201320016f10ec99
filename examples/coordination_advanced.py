"""Advanced coordination from the README: window limits, barrier, lease, deadlock config, monitoring.

Run: python examples/coordination_advanced.py
"""

import asyncio

from agent import Context, StateResult
from agent.coordination import PrimitiveType, RateLimitStrategy, create_coordinated_agent

agent = create_coordinated_agent("advanced_workflow", isolation="inline")

# Sliding window rate limit: max_rate is per second, so 100/s over a 60 s window = 6000 per minute
agent.add_state_rate_limit("api_call", max_rate=100.0, strategy=RateLimitStrategy.SLIDING_WINDOW, window_size=60.0)

# Leaky bucket for smooth flow
agent.add_state_rate_limit("data_ingestion", max_rate=50.0, strategy=RateLimitStrategy.LEAKY_BUCKET, window_size=1.0)

# Create synchronization point
agent.add_state_coordination(
    "merge_results",
    PrimitiveType.BARRIER,
    max_count=5,  # Wait for 5 states
    wait_timeout=30.0,  # Timeout after 30 seconds
)

# Time-based exclusive access
agent.add_state_coordination("batch_process", PrimitiveType.LEASE, ttl=600.0)  # 10 minute lease

# Configure deadlock detection
agent._coordinator.deadlock_detector.detection_interval = 1.0
agent._coordinator.deadlock_detector.max_cycles = 100

# Configure cleanup
agent._coordinator.cleanup_interval = 60.0  # 1 minute


async def split(context: Context) -> StateResult:
    return [f"process_chunk_{i}" for i in range(5)]


async def process_chunk(context: Context) -> StateResult:
    # Process data chunk
    context.set_state(context.state_name, "done")
    return "merge_results"


async def merge_results(context: Context) -> StateResult:
    # Executes when all chunks complete
    context.set_state("merged", sorted(k for k in context.keys() if k.startswith("process_chunk_")))
    return "batch_process"


async def process_batch(context: Context) -> StateResult:
    # Lease ensures single execution
    return "monitor_coordination"


async def monitor_coordination(context: Context) -> StateResult:
    status = await agent.get_coordination_status()

    # Check primitive states
    for name, state in status["primitives"].items():
        print(f"Primitive {name}: {state['state']}")
        print(f"Active owners: {len(state['owners'])}")
        print(f"Wait count: {state['wait_count']}")

    # Check deadlock detector
    detector = status["deadlock_detector"]
    print(f"Detected cycles: {detector['cycle_count']}")
    if status["deadlock_detector"]["cycle_count"] > 0:
        print("Deadlock detected!")
    return "cleanup_resources"


async def cleanup_resources(context: Context) -> StateResult:
    await agent.reset_coordination()
    return None


agent.add_state("split", split)
for i in range(5):
    agent.add_state(f"process_chunk_{i}", process_chunk)
agent.add_state("merge_results", merge_results)
agent.add_state("batch_process", process_batch)
agent.add_state("monitor_coordination", monitor_coordination)
agent.add_state("cleanup_resources", cleanup_resources)


async def main() -> None:
    context = await agent.run()
    print("merged:", context.get_state("merged"))


if __name__ == "__main__":
    asyncio.run(main())
