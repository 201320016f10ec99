"""More than one machine: the same workflow with every state a Ray task.

Four shards of a dataset are scored in parallel, each as a Ray task that asks for one
CPU and 256 MiB; the pool the size of the cluster (``cluster_pool()``) decides which
shard starts when, Ray decides on which node. The scoring state is also confined on its
node (``ray_options(isolation="process")``): there it runs in a child limited by cgroups
to those 256 MiB, as ``isolation="process"`` does on one box. Writes come back to this
process; ``agent.logs()`` shows what each task printed.

    python examples/ray_cluster.py                        # starts a local Ray cluster
    RAY_ADDRESS=auto python examples/ray_cluster.py       # the one `ray start --head` runs here
    RAY_ADDRESS=ray://head:10001 python examples/ray_cluster.py

The cluster's nodes need this package (``pip install 'agent-isolation[ray]'``); a
confined state also needs root (or a delegated cgroup) on its node, see ``agent doctor``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics

from agent import Agent, Context, ResourceRequirements, StateResult
from agent.ray import cluster_pool, ray_options

SHARDS = 4
SHARD = ResourceRequirements(cpu_units=1, memory_mb=256)

agent = Agent("ray_cluster", isolation="ray")


async def split(context: Context) -> StateResult:
    readings = [float((i * 37) % 101) for i in range(40_000)]
    size = len(readings) // SHARDS
    for i in range(SHARDS):
        context.set_state(f"shard_{i}", readings[i * size:(i + 1) * size])
    return [f"score_{i}" for i in range(SHARDS)]


def make_scorer(i: int):
    @ray_options(isolation="process")
    async def score(context: Context) -> StateResult:
        shard = context.get_state(f"shard_{i}")
        print(f"shard {i}: {len(shard)} readings on {socket.gethostname()} (pid {os.getpid()})")
        context.set_state(f"score_{i}", {"mean": statistics.fmean(shard), "max": max(shard)})
        return "merge"

    return score


async def merge(context: Context) -> StateResult:
    scores = [context.get_state(f"score_{i}") for i in range(SHARDS)]
    context.set_state("summary", {"mean": statistics.fmean(s["mean"] for s in scores),
                                  "max": max(s["max"] for s in scores)})
    return None


agent.add_state("split", split)
for index in range(SHARDS):
    agent.add_state(f"score_{index}", make_scorer(index), resources=SHARD)
agent.add_state("merge", merge)


async def main() -> None:
    agent.resource_pool = cluster_pool()  # connects: the caller's ray.init, RAY_ADDRESS, or a local cluster
    context = await agent.run()
    print("summary:", context.get_state("summary"))
    for i in range(SHARDS):
        print(agent.logs(f"score_{i}").strip())


if __name__ == "__main__":
    asyncio.run(main())
