"""Custom metric aggregation: KPIs computed from the metrics stream.

Run: python examples/monitoring_custom_aggregation.py
"""

import asyncio
from collections import defaultdict

from agent import Agent
from agent_monitor import MetricAggregation, agent_monitor


# Create custom metric handler
class CustomMetrics:
    def __init__(self):
        self.metrics = defaultdict(MetricAggregation)

    async def handle_metrics(self, data: dict):
        for category, metrics in data.items():
            for name, values in metrics.items():
                self.metrics[f"{category}_{name}"].add(values['avg'])

        # Calculate custom KPIs
        throughput = self.metrics['throughput_states_per_second'].avg
        cpu_usage = self.metrics['resources_used_CPU'].avg
        efficiency = throughput / cpu_usage if cpu_usage > 0 else 0
        print(f"Workflow efficiency: {efficiency:.2f}")


def build_workflow(steps: int = 100) -> Agent:
    agent = Agent("custom_metrics_workflow", isolation="inline")

    async def step(context):
        count = context.get_state("count", 0) + 1
        context.set_state("count", count)
        context.set_state("checksum", sum(i * i for i in range(20_000)))  # some real CPU
        return "step" if count < steps else None

    agent.add_state("step", step)
    return agent


# Use custom metrics handler
metrics_handler = CustomMetrics()
@agent_monitor(
    metrics_callback=metrics_handler.handle_metrics,
    realtime=True
)
async def run_with_custom_metrics():
    # Run workflow...
    await build_workflow().run()


if __name__ == "__main__":
    asyncio.run(run_with_custom_metrics())
