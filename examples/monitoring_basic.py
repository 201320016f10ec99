"""Basic monitoring, as the README shows it: metrics of every run inside a coroutine.

Run: python examples/monitoring_basic.py
"""

import asyncio

from agent import Agent
from agent_monitor import MetricType, agent_monitor


def build_workflow() -> Agent:
    agent = Agent("monitored_workflow", isolation="inline")

    async def fetch(context):
        context.set_state("items", list(range(20)))
        return ["clean", "enrich"]

    async def clean(context):
        await asyncio.sleep(0.01)
        return "publish"

    async def enrich(context):
        await asyncio.sleep(0.02)
        return "publish"

    async def publish(context):
        return None

    for name, func in (("fetch", fetch), ("clean", clean), ("enrich", enrich), ("publish", publish)):
        agent.add_state(name, func)
    return agent


# Enable monitoring with decorator
@agent_monitor(
    metrics=MetricType.ALL,  # Track all metric types
    realtime=True,          # Enable real-time updates
    update_interval=1.0     # Update every second
)
async def run_workflow():
    agent = build_workflow()
    await agent.run()


# Custom metrics callback
async def handle_metrics(metrics: dict):
    print(f"Current throughput: {metrics['throughput']['states_per_second']['avg']:.1f} states/s")
    print(f"Resource usage: {metrics['resources']['used_CPU']['current']:.1f}% of a core")


# Run with metrics handling
@agent_monitor(metrics_callback=handle_metrics)
async def run_monitored():
    await run_workflow()


if __name__ == "__main__":
    asyncio.run(run_monitored())
    print(f"states completed: {run_monitored.last_metrics['state']['completed']['sum']:.0f}")
