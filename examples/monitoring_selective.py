"""Selective metric collection: only timing, resources and throughput.

Run: python examples/monitoring_selective.py
"""

import asyncio
import json

from agent import Agent
from agent_monitor import MetricType, agent_monitor


def build_workflow(shards: int = 8) -> Agent:
    agent = Agent("optimized_workflow", isolation="inline")
    names = [f"shard_{i}" for i in range(shards)]

    async def split(context):
        return names

    async def work(context):
        await asyncio.sleep(0.005)
        return "combine"

    async def combine(context):
        return None

    agent.add_state("split", split)
    for name in names:
        agent.add_state(name, work)
    agent.add_state("combine", combine)
    return agent


# Monitor specific metrics
@agent_monitor(
    metrics=(
        MetricType.TIMING |      # Track execution times
        MetricType.RESOURCES |   # Monitor resource usage
        MetricType.THROUGHPUT    # Measure operations/second
    ),
    aggregate=True  # Get aggregated statistics
)
async def run_optimized():
    agent = build_workflow()
    # Add states and run...
    await agent.run()


if __name__ == "__main__":
    asyncio.run(run_optimized())
    metrics = run_optimized.last_metrics  # the final metrics, kept on the wrapper
    summary = {
        "categories": sorted(metrics),
        "states": metrics["timing"]["total_execution"]["count"],
        "p95_ms": round(metrics["timing"]["total_execution"]["p95"], 2),
        "states_per_second": round(metrics["throughput"]["states_per_second"]["avg"], 1),
    }
    print(json.dumps(summary, indent=2))
