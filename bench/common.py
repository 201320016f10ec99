"""What more than one bench script needs: CPU time of a process tree, a chain of no-op states,
``process`` launch latencies, percentiles."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil


def tree_cpu_seconds() -> float:
    """User and system CPU seconds of this process and every live descendant (a local Ray
    cluster's processes, say)."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def chain_agent(name: str, isolation: str, n: int, busy_s: float = 0.0, **options: Any) -> Any:
    """An agent of ``n`` states run one after the other, each returning the next one's name
    (after waiting ``busy_s`` seconds, as a state waiting on a service would)."""
    from agent import Agent

    agent = Agent(name, isolation=isolation, **options)
    names = [f"s{i}" for i in range(n)]
    for state, following in zip(names, names[1:] + [None]):
        async def step(context, following=following):
            if busy_s:
                await asyncio.sleep(busy_s)
            return following

        agent.add_state(state, step, next_states=[following] if following else [])
    return agent


async def launch_latencies(n: int) -> list[float]:
    """Seconds from a ``process`` attempt requested (its executor called) to its state's first
    line, from the monotonic clock every process of the box shares; ``n`` launches one at a
    time, as a chain's would be. Each is run as the engine runs it: the outcome comes with
    the result, and the process exits meanwhile (awaited before the next launch)."""
    from agent.context import Context
    from agent.executor import Attempt, Isolation
    from agent.supervisor import get_executor

    async def started_at(context: Any) -> float:  # local: copied by value, the child imports nothing
        return time.monotonic()

    executor = get_executor(Isolation.PROCESS)
    ctx = Context(run_id="bench-launch")
    out = []
    for i in range(n):
        attempt = Attempt("bench-launch", "bench", "latency", started_at, i + 1, context=ctx,
                          isolation=Isolation.PROCESS)
        attempt.settle = set()
        t0 = time.monotonic()
        outcome = await executor.run_attempt(attempt)
        out.append(outcome.result - t0)
        if attempt.settle:
            await asyncio.wait(attempt.settle)
        await asyncio.sleep(0.002)
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
