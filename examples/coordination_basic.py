"""Coordination basics from the README: rate limit, mutex, semaphore, quota.

Run: python examples/coordination_basic.py
"""

import asyncio
import time

from agent import Agent, Context, StateResult
from agent.coordination import PrimitiveType, RateLimitStrategy, create_coordinated_agent, enhance_agent

# Create agent with coordination enabled
agent = create_coordinated_agent("coordinated_workflow", isolation="inline")

# Or enhance existing agent
other = enhance_agent(Agent("my_workflow"))

# Add rate limit to specific state
agent.add_state_rate_limit(
    "api_call",
    max_rate=10.0,  # 10 calls per second
    strategy=RateLimitStrategy.TOKEN_BUCKET,
    burst_size=5,  # Allow bursts of 5 calls
)

# Add mutex for resource access
agent.add_state_coordination("database_write", PrimitiveType.MUTEX, ttl=30.0)  # Auto-release after 30 seconds

# Limit concurrent operations
agent.add_state_coordination("heavy_process", PrimitiveType.SEMAPHORE, max_count=3)  # Allow 3 concurrent executions

# Add quota management
agent.add_state_coordination(
    "gpu_task",
    PrimitiveType.QUOTA,
    quota_limit=16.0,  # Total GPU memory limit
    ttl=3600.0,  # Reset quota hourly
)

calls: list[float] = []


async def start(context: Context) -> StateResult:
    context.set_state("data", {"rows": 3})
    return ["api_call", "database_write", "heavy_process", "gpu_task"]


async def api_call(context: Context) -> StateResult:
    # Rate limiting handled automatically: 5 at once, then one every 0.1 s
    calls.append(time.monotonic())
    return "api_call" if len(calls) < 8 else None


async def write_to_db(context: Context) -> StateResult:
    # Mutex ensures exclusive access
    data = context.get_state("data")
    context.set_state("written", data["rows"])
    return None


async def process_batch(context: Context) -> StateResult:
    # Semaphore controls concurrency
    return None


async def train_model(context: Context) -> StateResult:
    # Quota ensures resource availability
    return None


agent.add_state("start", start)
agent.add_state("api_call", api_call)
agent.add_state("database_write", write_to_db)
agent.add_state("heavy_process", process_batch)
agent.add_state("gpu_task", train_model)


async def main() -> None:
    context = await agent.run()
    gaps = [round(b - a, 3) for a, b in zip(calls, calls[1:])]
    print("api_call starts, seconds apart:", gaps)
    print("rows written:", context.get_state("written"))
    status = await agent.get_coordination_status()
    for name, state in status["primitives"].items():
        print(f"Primitive {name}: {state['state']} (owners {len(state['owners'])}, waiting {state['wait_count']})")
    print("enhanced agent:", type(other).__name__)


if __name__ == "__main__":
    asyncio.run(main())
