"""How fast the resource pool decides, printed as JSON.

* ``fast_path_us``: one try_acquire + release pair on an uncontended pool (the cost
  the inline engine pays per state with ResourceRequirements declared).
* ``decisions_per_s``: with ``--waiting`` (1,000) states of mixed priorities and sizes
  queued, how many scheduling decisions per second the pool makes. A decision is one
  release or one new request, each of which settles the queue (grants whatever may
  run now). ``grants_per_s`` counts the requests admitted.
* ``admission_latency_us``: from a release to the grant decision it leads to (the
  release call settles the queue; ``grant_next`` hands over the owners), p50 / p99.
* ``find_victims_us``: choosing preemption victims among ``--holders`` running states.
* ``agents``: the same through the engine, end to end: ``--agents`` (20) agents share one
  pool and start ``--waiting`` (1,000) states between them, of mixed sizes and
  priorities, far more than fit at once; every state yields once to the loop and ends.
  ``decisions_per_s`` counts the pool's grants and releases while the queue drains,
  ``states_per_s`` the states completed.

Run: ``python bench/pool.py [--waiting 1000] [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.resources import Priority, ResourcePool, ResourceRequirements, ResourceType  # noqa: E402

SIZES = [  # (cpu, memory MiB, gpu): many small, some large
    (0.5, 256, 0), (1, 512, 0), (1, 1024, 0), (2, 2048, 0), (4, 4096, 0), (8, 16384, 0), (2, 8192, 1), (4, 16384, 2),
]
LEVELS = [Priority.LOW, Priority.NORMAL, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL]


def request(rng: random.Random) -> ResourceRequirements:
    cpu, memory, gpu = rng.choice(SIZES)
    return ResourceRequirements(cpu_units=cpu, memory_mb=memory, gpu_units=gpu, priority=rng.choice(LEVELS))


def fast_path(pairs: int) -> float:
    pool = ResourcePool(total_cpu=64, total_memory=262144, total_gpu=8)
    req = ResourceRequirements(cpu_units=1, memory_mb=100)
    start = time.perf_counter()
    for _ in range(pairs):
        pool.try_acquire("s", req)
        pool.release("s")
    return (time.perf_counter() - start) / pairs * 1e6


def contended(waiting: int, seconds: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    pool = ResourcePool(total_cpu=64, total_memory=262144, total_io=1000, total_network=1000, total_gpu=8)
    holders: list[str] = []
    queued = 0
    counter = 0

    def admit(granted: list[str]) -> None:
        nonlocal queued
        holders.extend(granted)
        queued -= len(granted)

    def top_up() -> int:
        nonlocal counter, queued
        made = 0
        while queued < waiting:
            counter += 1
            pool.enqueue(f"s{counter}", request(rng))
            queued += 1
            made += 1
            admit(pool.grant_next())
        return made

    top_up()
    decisions = grants = 0
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(200):
            owner = holders.pop(rng.randrange(len(holders)))
            t0 = time.perf_counter_ns()
            pool.release(owner)
            granted = pool.grant_next()
            t1 = time.perf_counter_ns()
            decisions += 1
            if granted:
                latencies.append((t1 - t0) / 1000)
                grants += len(granted)
                admit(granted)
            decisions += top_up()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "decisions_per_s": round(decisions / elapsed),
        "grants_per_s": round(grants / elapsed),
        "admission_latency_us_p50": round(statistics.median(latencies), 1) if latencies else None,
        "admission_latency_us_p99": round(latencies[int(len(latencies) * 0.99)], 1) if latencies else None,
        "waiting_at_end": pool.statistics().waiting,
        "holders_at_end": pool.statistics().holders,
    }


def victims(holders: int, rounds: int, seed: int, mixed: bool) -> float:
    """Time to choose victims for a HIGH request of 3 cores among a full pool of lower ones."""
    rng = random.Random(seed)
    total = 0.0
    for _ in range(rounds):
        pool = ResourcePool(total_cpu=holders * 4, total_memory=holders * 4096, total_io=holders,
                            total_network=holders, total_gpu=0, enable_preemption=True)
        for i in range(holders):
            cpu = rng.choice([0.5, 1, 1.5, 2, 3, 4]) if mixed else 4
            pool.try_acquire(f"h{i}", ResourceRequirements(cpu_units=cpu, memory_mb=cpu * 1024,
                                                           priority=rng.choice([Priority.LOW, Priority.NORMAL])))
        free = pool.available(ResourceType.CPU)
        req = ResourceRequirements(cpu_units=free + 5, memory_mb=1024, priority=Priority.HIGH)
        start = time.perf_counter()
        chosen = pool.find_victims("big", req)
        total += time.perf_counter() - start
        assert chosen
    return total / rounds * 1e6


def agents_draining(agents: int, waiting: int, seed: int) -> dict[str, float]:
    """20 agents, 1,000 waiting states, one pool: how fast the one queue drains end to end."""
    import asyncio

    import uvloop

    from agent import Agent

    rng = random.Random(seed)
    pool = ResourcePool(total_cpu=16, total_memory=65536, total_io=1000, total_network=1000, total_gpu=0)
    per_agent = waiting // agents

    async def work(context):
        await asyncio.sleep(0)

    def build(i: int) -> Agent:
        agent = Agent(f"agent{i}", isolation="inline", resource_pool=pool)
        names = [f"s{j}" for j in range(per_agent)]

        async def start(context):
            return names

        agent.add_state("start", start)
        for name in names:
            cpu, memory, _ = rng.choice([s for s in SIZES if s[2] == 0])
            agent.add_state(name, work, resources=ResourceRequirements(
                cpu_units=cpu, memory_mb=memory, io_weight=0, network_weight=0, priority=rng.choice(LEVELS)))
        return agent

    built = [build(i) for i in range(agents)]

    async def drain() -> float:
        began = time.perf_counter()
        await asyncio.gather(*(a.run() for a in built))
        return time.perf_counter() - began

    granted_before = pool.statistics().granted
    elapsed = uvloop.run(drain())
    grants = pool.statistics().granted - granted_before
    assert pool.statistics().waiting == 0 and pool.statistics().holders == 0
    return {
        "agents": agents,
        "states": agents * per_agent,
        "seconds": round(elapsed, 3),
        "decisions_per_s": round(2 * grants / elapsed),  # each grant and each release settles the queue
        "states_per_s": round(agents * per_agent / elapsed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--agents", type=int, default=20)
    args = parser.parse_args()
    result = {
        "bench": "pool",
        "python": sys.version.split()[0],
        "waiting": args.waiting,
        "fast_path_us": round(fast_path(100_000), 2),
        **contended(args.waiting, args.seconds, args.seed),
        "find_victims_us_200_alike_holders": round(victims(200, 20, args.seed, mixed=False), 1),
        "find_victims_us_200_mixed_holders": round(victims(200, 20, args.seed, mixed=True), 1),
        "agents": agents_draining(args.agents, args.waiting, args.seed),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
