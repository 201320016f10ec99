"""Cost of monitoring: inline states/s with no monitor, a MetricsCollector, and @agent_monitor.

Run: python bench/monitor.py [--quick]. Prints one JSON object. Also measures the
collector alone (events per second it absorbs) and one metrics() read.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from inline import chain_agent, fanout_agent, measure, run_cli

from agent import Agent, events
from agent.monitor import MetricsCollector, agent_monitor


async def rate(agent: Agent, states_per_run: int, seconds: float) -> float:
    return (await measure(agent, states_per_run, seconds))["states_per_s_median"]


async def workload(seconds: float) -> dict[str, float]:
    return {
        "chain_3": round(await rate(chain_agent(), 3, seconds)),
        "fanout_100_join": round(await rate(fanout_agent(), 102, seconds)),
    }


def collector_alone(n: int) -> dict[str, float]:
    collector = MetricsCollector()
    evs = [events.RunEvent(events.RUN_STARTED, "wf", "r")]
    for i in range(n):
        evs.append(events.RunEvent(events.STATE_STARTED, "wf", "r", f"s{i % 50}", 1))
        evs.append(events.RunEvent(events.STATE_COMPLETED, "wf", "r", f"s{i % 50}", 1, duration=0.001))
    t0 = time.perf_counter()
    for event in evs:
        collector(event)
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    collector.sample(final=True)
    collector.metrics()
    read = time.perf_counter() - t1
    return {"events_per_s": round(len(evs) / elapsed), "metrics_read_ms": round(read * 1000, 3)}


async def main(quick: bool) -> dict[str, object]:
    seconds = 0.3 if quick else 1.5
    out: dict[str, object] = {"python": sys.version.split()[0]}
    out["no_monitor"] = await workload(seconds)
    with events.observing(MetricsCollector()):
        out["collector_attached"] = await workload(seconds)

    @agent_monitor(realtime=True, update_interval=0.25, metrics_callback=lambda m: None)
    async def monitored() -> dict[str, float]:
        return await workload(seconds)

    out["agent_monitor_realtime"] = await monitored()
    out["collector_alone"] = collector_alone(20_000 if quick else 200_000)
    return out


if __name__ == "__main__":
    run_cli(main, __doc__)
