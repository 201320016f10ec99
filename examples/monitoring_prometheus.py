"""Export the metrics of running workflows to Prometheus, then scrape them once.

Run: python examples/monitoring_prometheus.py [--port 9464] [--serve SECONDS]
"""

import argparse
import asyncio
import urllib.request

from agent import Agent
from agent.monitor import RealTimeMetrics, start_prometheus_exporter


def build_workflow() -> Agent:
    agent = Agent("exported_workflow", isolation="inline")

    async def extract(context):
        return ["transform_a", "transform_b"]

    async def transform(context):
        await asyncio.sleep(0.01)
        return "load"

    async def load(context):
        return None

    agent.add_state("extract", extract)
    agent.add_state("transform_a", transform)
    agent.add_state("transform_b", transform)
    agent.add_state("load", load)
    return agent


async def main(port: int = 0, serve: float = 0.0) -> str:
    rt = RealTimeMetrics(update_interval=0.5)
    with start_prometheus_exporter(rt, port=port) as exporter:
        print(f"serving {exporter.url}")
        await rt.start()
        try:
            for _ in range(3):
                await build_workflow().run()
            if serve:
                await asyncio.sleep(serve)  # time for a Prometheus server to scrape
        finally:
            await rt.stop()
        # Scraping blocks, so do it off the event loop.
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(exporter.url, timeout=10).read().decode())
    return body


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--serve", type=float, default=0.0, help="keep serving this many seconds after the runs")
    args = parser.parse_args()
    text = asyncio.run(main(args.port, args.serve))
    print("\n".join(line for line in text.splitlines() if line.startswith(("agent_state_", "agent_errors_"))))
