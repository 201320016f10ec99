"""Makespan of a batch: eight pipelines of three steps, started by one fan-out, each step a fixed sleep.

Branches that cannot meet run independently (dataflow joins), so the batch should take
as long as its longest pipeline, not the sum of each step's slowest branch (what a run
in supersteps or waves takes). Prints JSON: the makespan, the longest pipeline, their
ratio (target <= 1.05), and the wave time for comparison.

Run: ``python bench/makespan.py [--scale 0.05] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from agent import Agent  # noqa: E402

# Step durations (relative units) of pipelines 0..7: prepare, train, eval.
STEPS = [
    (1, 8, 1), (2, 2, 2), (4, 1, 3), (1, 1, 1), (3, 5, 2), (6, 1, 1), (1, 3, 6), (2, 6, 2),
]


def build(scale: float) -> Agent:
    agent = Agent("batch", isolation="inline")

    async def start(context):
        return [f"prepare_{i}" for i in range(len(STEPS))]

    agent.add_state("start", start)
    for i, durations in enumerate(STEPS):
        kinds = ("prepare", "train", "eval")
        for k, kind in enumerate(kinds):
            nxt = f"{kinds[k + 1]}_{i}" if k + 1 < len(kinds) else None

            async def step(context, seconds=durations[k] * scale, nxt=nxt):
                await asyncio.sleep(seconds)
                return nxt

            agent.add_state(f"{kind}_{i}", step, next_states=[nxt] if nxt else [])
    return agent


async def main(scale: float, repeat: int) -> dict[str, object]:
    longest = max(sum(d) for d in STEPS) * scale
    waves = sum(max(d[k] for d in STEPS) for k in range(3)) * scale
    spans = []
    for _ in range(repeat):
        agent = build(scale)
        began = time.perf_counter()
        await agent.run()
        spans.append(time.perf_counter() - began)
    makespan = statistics.median(spans)
    return {
        "makespan_s": round(makespan, 4),
        "longest_pipeline_s": round(longest, 4),
        "ratio_to_longest": round(makespan / longest, 3),
        "waves_s": round(waves, 4),
        "runs": [round(s, 4) for s in spans],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.05, help="seconds per relative unit")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import uvloop

    print(json.dumps(uvloop.run(main(args.scale, args.repeat)), indent=2))
