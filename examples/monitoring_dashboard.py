"""A terminal dashboard fed by RealTimeMetrics, as the README shows it.

Run: python examples/monitoring_dashboard.py
"""

import asyncio

from agent import Agent, RetryPolicy
from agent_monitor import RealTimeMetrics, agent_monitor


# Create real-time metrics dashboard
class MetricsDashboard:
    def __init__(self):
        self.rt_metrics = RealTimeMetrics(update_interval=1.0)

    async def update_dashboard(self, metrics: dict):
        # Update dashboard with latest metrics
        throughput = metrics['throughput']['states_per_second']['avg']
        errors = metrics['errors']['count']['sum']
        cpu_usage = metrics['resources']['used_CPU']['current']

        print("\033[2J\033[H")  # Clear screen
        print("=== Workflow Dashboard ===")
        print(f"Throughput: {throughput:.2f} states/sec")
        print(f"Errors: {errors}")
        print(f"CPU Usage: {cpu_usage:.1f}%")

    async def start(self):
        self.rt_metrics.subscribe(self.update_dashboard)
        self.rt_metrics.start()

    async def stop(self):
        self.rt_metrics.stop()


def build_workflow(flaky_failures: int = 2, seconds: float = 1.2) -> Agent:
    agent = Agent("dashboard_workflow", isolation="inline")
    left = {"failures": flaky_failures}

    async def poll(context):
        count = context.get_state("polls", 0) + 1
        context.set_state("polls", count)
        await asyncio.sleep(seconds / 50)
        return "poll" if count < 50 else "flaky_upload"

    async def flaky_upload(context):
        if left["failures"] > 0:
            left["failures"] -= 1
            raise ConnectionError("upload refused")
        return None

    agent.add_state("poll", poll)
    agent.add_state("flaky_upload", flaky_upload,
                    retry_policy=RetryPolicy(max_retries=3, initial_delay=0.01, jitter=False))
    return agent


# Use dashboard in workflow
dashboard = MetricsDashboard()
@agent_monitor(
    metrics_callback=dashboard.update_dashboard,
    realtime=True
)
async def run_with_dashboard():
    await dashboard.start()
    try:
        # Run workflow...
        await build_workflow().run()
    finally:
        await dashboard.stop()


if __name__ == "__main__":
    asyncio.run(run_with_dashboard())
