"""Inline engine throughput: states/s for a 3-state chain and a 100-way fan-out with join,
and for a chain of 1,000 states each depending on the one before (the engine's cost per
state must not grow with the workflow's size).

Run: python bench/inline.py [--quick]. Prints one JSON object. The workloads and the
measuring loop are shared by the other benches that compare against plain inline runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from agent import Agent, ResourcePool, ResourceRequirements

RESOURCES = ResourceRequirements(cpu_units=0.001, memory_mb=1, io_weight=0.001, network_weight=0.001)


def add_chain(agent: Agent, resources: ResourceRequirements | None = None) -> Agent:
    """Add the no-op chain s1 -> s2 -> s3 to ``agent``."""

    async def s1(context):
        return "s2"

    async def s2(context):
        return "s3"

    async def s3(context):
        return None

    for name, fn in (("s1", s1), ("s2", s2), ("s3", s3)):
        agent.add_state(name, fn, resources=resources)
    return agent


def chain_agent(with_resources: bool = False, pool: ResourcePool | None = None) -> Agent:
    agent = Agent("bench_chain", isolation="inline", resource_pool=pool)
    return add_chain(agent, RESOURCES if with_resources else None)


def fanout_agent(width: int = 100, with_resources: bool = False, pool: ResourcePool | None = None) -> Agent:
    agent = Agent("bench_fanout", isolation="inline", resource_pool=pool)
    names = [f"w{i}" for i in range(width)]

    async def start(context):
        return names

    async def work(context):
        return "join"

    async def join(context):
        return None

    res = RESOURCES if with_resources else None
    agent.add_state("start", start, resources=res)
    for n in names:
        agent.add_state(n, work, resources=res)
    agent.add_state("join", join, resources=res)
    return agent


def dependency_chain_agent(length: int = 1000) -> Agent:
    """``length`` no-op states, each with a dependency on the one before."""

    async def step(context):
        return None

    agent = Agent("bench_dependency_chain", isolation="inline", max_steps=length + 1)
    for i in range(length):
        agent.add_state(f"s{i}", step, dependencies=[f"s{i - 1}"] if i else [])
    return agent


async def measure(agent: Agent, states_per_run: int, min_seconds: float) -> dict[str, float]:
    rates = []
    total_states = 0
    began = time.perf_counter()
    while time.perf_counter() - began < min_seconds or len(rates) < 5:
        t0 = time.perf_counter()
        runs = 0
        while time.perf_counter() - t0 < 0.05:
            await agent.run()
            runs += 1
        elapsed = time.perf_counter() - t0
        rates.append(runs * states_per_run / elapsed)
        total_states += runs * states_per_run
    return {"states_per_s_median": round(statistics.median(rates)), "states_per_s_best": round(max(rates)),
            "states": total_states}


async def main(quick: bool) -> dict[str, object]:
    seconds = 0.3 if quick else 2.0
    pool = ResourcePool(total_cpu=1000, total_memory=10**6, total_io=1000, total_network=1000, total_gpu=0)
    out: dict[str, object] = {"python": sys.version.split()[0]}
    for with_res in (False, True):
        key = "with_resources" if with_res else "without_resources"
        out[key] = {
            "chain_3": await measure(chain_agent(with_res, pool), 3, seconds),
            "fanout_100_join": await measure(fanout_agent(100, with_res, pool), 102, seconds),
        }
    out["dependency_chain_1000"] = await measure(dependency_chain_agent(1000), 1000, seconds)
    return out


def run_cli(main: Callable[[bool], Awaitable[dict[str, Any]]], description: str | None) -> None:
    """``--quick`` and ``--loop``, run ``main(quick)`` on that loop, print its JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(main(args.quick))
    else:
        result = asyncio.run(main(args.quick))
    result["loop"] = args.loop
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_cli(main, __doc__)
