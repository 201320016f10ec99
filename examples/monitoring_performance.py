"""Performance analysis: P95 latency and throughput against thresholds.

Run: python examples/monitoring_performance.py
"""

import asyncio
import logging

from agent import Agent
from agent_monitor import MetricType, agent_monitor


async def process_metrics(data: dict):
    # Extract performance metrics
    latency = data['timing']['total_execution']['p95']
    throughput = data['throughput']['states_per_second']['avg']

    # Log performance data
    logging.info(f"P95 Latency: {latency:.1f}ms")
    logging.info(f"Avg Throughput: {throughput:.1f} states/sec")

    # Check performance thresholds
    if latency > 1000:  # 1 second
        logging.warning("High latency detected")
    if throughput < 10:
        logging.warning("Low throughput detected")


def build_workflow() -> Agent:
    agent = Agent("performance_workflow", isolation="inline")

    async def ingest(context):
        return [f"score_{i}" for i in range(5)]

    async def score(context):
        await asyncio.sleep(0.002)
        return "rank"

    async def rank(context):
        return None

    agent.add_state("ingest", ingest)
    for i in range(5):
        agent.add_state(f"score_{i}", score)
    agent.add_state("rank", rank)
    return agent


# Detailed performance monitoring, with the analysis as the callback
@agent_monitor(
    metrics=(
        MetricType.TIMING |
        MetricType.THROUGHPUT |
        MetricType.LATENCY
    ),
    metrics_callback=process_metrics,
)
async def analyze_performance():
    agent = build_workflow()
    # Add states and run...
    await agent.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(analyze_performance())
