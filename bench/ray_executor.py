"""Our Ray executor against plain Ray tasks, on the same no-op fan-out, in one run (prints JSON).

A local Ray cluster is started first (``--cpus``, default 2) and warmed up; then, for
each workload, the two sides alternate ``--repeat`` times and the medians are reported.

* ``fan_out``: one state returns ``--states`` names (default 200), each a no-op state on
  Ray with no ResourceRequirements, so each asks Ray for its default of one CPU and Ray
  queues them; plain Ray: as many ``@ray.remote`` no-op tasks of one CPU, gathered.
* ``fan_out_with_resources``: the same states declaring ``ResourceRequirements(cpu_units=1,
  memory_mb=0)`` under a pool the size of the cluster, so that our admission, not Ray's
  queue, decides when each starts (``--cpus`` at a time); plain Ray as above.
* ``fan_out_with_writes``: as ``fan_out``, each state writing one context key; plain Ray
  as above.
* ``chain_50``: 50 no-op Ray states one after the other; plain Ray: 50 tasks, each
  awaited before the next is submitted.
* ``fan_out_10ms``: as ``fan_out``, each state (and each plain task) holding its worker
  for 10 ms: the overhead in proportion to a little work.

``ratio`` is ours / plain Ray's time (medians; ``pair_ratio_median``: the median of the
ratios of runs side by side); ``overhead_ms_per_state`` is the difference per state;
``*_cpu_ms_per_state`` the CPU time of this process and the whole local cluster per state
(workers that exit meanwhile are not counted), which moves less with the load. Ray itself
moves ±10-50% between runs on a shared 2-core machine: compare ratios
measured in one run.

Run: ``python bench/ray_executor.py [--states 200] [--repeat 9] [--cpus 2]``. (Not ``bench/ray.py``: run
as a script, that name would shadow Ray itself.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from agent import Agent, ResourceRequirements  # noqa: E402
from agent.ray import cluster_pool  # noqa: E402
from common import chain_agent, tree_cpu_seconds  # noqa: E402  (bench/, this script's directory)


async def noop(context):
    return None


async def write_one(context):
    context.set_state(context.state_name, 1)
    return None


async def sleep_10ms(context):
    time.sleep(0.01)  # work that holds its worker, as plain_sleep does
    return None


@ray.remote(num_cpus=1, max_retries=0)
def plain_noop():
    return None


@ray.remote(num_cpus=1, max_retries=0)
def plain_sleep():
    time.sleep(0.01)


def fan_out_agent(n: int, state, with_resources: bool) -> Agent:
    names = [f"s{i}" for i in range(n)]

    async def start(context):
        return names

    agent = Agent("bench_ray", isolation="ray", resource_pool=cluster_pool() if with_resources else None)
    agent.add_state("start", start, isolation="inline", next_states=names)
    need = ResourceRequirements(cpu_units=1, memory_mb=0) if with_resources else None
    for name in names:
        agent.add_state(name, state, resources=need, next_states=[])
    return agent


async def timed(run) -> tuple[float, float]:
    cpu, began = tree_cpu_seconds(), time.perf_counter()
    await run()
    return time.perf_counter() - began, tree_cpu_seconds() - cpu


async def ours(n: int, state, with_resources: bool) -> tuple[float, float]:
    agent = chain_agent("bench_ray_chain", "ray", n) if state is None else fan_out_agent(n, state, with_resources)
    return await timed(agent.run)


async def plain(n: int, sequential: bool = False, task=plain_noop) -> tuple[float, float]:
    async def one_by_one():
        for _ in range(n):
            await task.remote()

    if sequential:
        return await timed(one_by_one)
    return await timed(lambda: asyncio.gather(*[task.remote() for _ in range(n)]))


async def compare(n: int, repeat: int, state, with_resources: bool = False) -> dict[str, float]:
    mine, theirs = [], []
    for _ in range(repeat):
        theirs.append(await plain(n, sequential=state is None, task=plain_sleep if state is sleep_10ms else plain_noop))
        mine.append(await ours(n, state, with_resources))
    a, b = statistics.median(t for t, _ in mine), statistics.median(t for t, _ in theirs)
    cpu_a, cpu_b = statistics.median(c for _, c in mine), statistics.median(c for _, c in theirs)
    return {
        "ours_s": round(a, 4), "plain_ray_s": round(b, 4), "ratio": round(a / b, 3),
        "ours_states_per_s": round(n / a, 1), "plain_ray_tasks_per_s": round(n / b, 1),
        "overhead_ms_per_state": round((a - b) / n * 1000, 3),
        "pair_ratio_median": round(statistics.median(x[0] / y[0] for x, y in zip(mine, theirs)), 3),
        "ratios": [round(x[0] / y[0], 3) for x, y in zip(mine, theirs)],
        "ours_cpu_ms_per_state": round(cpu_a / n * 1000, 3),
        "plain_ray_cpu_ms_per_state": round(cpu_b / n * 1000, 3),
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    await ours(args.states, noop, False)  # warm up: workers, the relay, imports on both sides
    await ours(args.states, write_one, True)
    await plain(args.states)
    return {
        "states": args.states,
        "cpus": args.cpus,
        "repeat": args.repeat,
        "ray": ray.__version__,
        "fan_out": await compare(args.states, args.repeat, noop, False),
        "fan_out_with_resources": await compare(args.states, args.repeat, noop, True),
        "fan_out_with_writes": await compare(args.states, args.repeat, write_one, False),
        "chain_50": await compare(50, args.repeat, None),
        "fan_out_10ms": await compare(args.states, args.repeat, sleep_10ms),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    temp_dir = tempfile.mkdtemp(prefix="agent-ray-bench-")
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=100 * 1024 * 1024, _temp_dir=temp_dir)
    try:
        print(json.dumps(asyncio.run(main(args)), indent=2))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
