"""What more than one bench script needs: CPU time of a process tree, a chain of no-op states,
percentiles."""

from __future__ import annotations

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


def chain_agent(name: str, isolation: str, n: int, **options: Any) -> Any:
    """An agent of ``n`` states run one after the other, each returning the next one's name."""
    from agent import Agent

    agent = Agent(name, isolation=isolation, **options)
    names = [f"s{i}" for i in range(n)]
    for state, following in zip(names, names[1:] + [None]):
        async def step(context, following=following):
            return following

        agent.add_state(state, step, next_states=[following] if following else [])
    return agent


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
