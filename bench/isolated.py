"""Process isolation: launch latency and throughput of isolated no-op states (prints JSON).

latency: state requested (executor called) -> first line of the state running, from the
monotonic clock, which is shared by every process of the box.
chain: a 200-state sequential workflow; fan_out: one state returning 200 names.
Both run through ``Agent(..., isolation="process")`` and, for comparison, straight
through the executor; each ``--repeat`` times, and the medians are reported.
``*_cpu_ms_per_state``: CPU time of this process, the zygote and
the children per state of the executor runs; on a shared box it moves less than the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent import Agent  # noqa: E402
from agent.context import Context  # noqa: E402
from agent.executor import Attempt, Isolation  # noqa: E402
from agent.supervisor import get_executor, shutdown_supervisor  # noqa: E402
from agent.supervisor.service import current_supervisor  # noqa: E402
from common import chain_agent, launch_latencies, percentile  # noqa: E402  (bench/, this script's directory)


async def noop(context):
    return None


async def launch_latency(n: int) -> dict[str, float]:
    samples = [s * 1000 for s in await launch_latencies(n)]
    return {"p50_ms": round(percentile(samples, 0.5), 3), "p99_ms": round(percentile(samples, 0.99), 3),
            "mean_ms": round(statistics.fmean(samples), 3), "samples": n}


async def engine_chain(n: int) -> float:
    agent = chain_agent("bench_chain", "process", n, max_steps=n + 10)
    t0 = time.perf_counter()
    await agent.run()
    return n / (time.perf_counter() - t0)


async def engine_fan_out(n: int) -> float:
    names = [f"leaf{i}" for i in range(n)]

    async def root(context):
        return names

    agent = Agent("bench_fan", isolation="process", max_steps=n + 10)
    agent.add_state("root", root)
    for name in names:
        agent.add_state(name, noop)
    t0 = time.perf_counter()
    await agent.run()
    return (n + 1) / (time.perf_counter() - t0)


def _cpu_seconds() -> float:
    """CPU time so far of this process, its zygote and the zygote's reaped children."""
    own = os.times()
    total = own.user + own.system
    sup = current_supervisor()
    if sup is not None:
        with open(f"/proc/{sup.zygote.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


async def executor_chain(n: int) -> tuple[float, float]:
    executor = get_executor(Isolation.PROCESS)
    ctx = Context(run_id="bench-chain")
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for i in range(n):
        await executor.run_attempt(Attempt("bench-chain", "bench", f"s{i}", noop, 1, context=ctx,
                                           isolation=Isolation.PROCESS))
    return n / (time.perf_counter() - t0), (_cpu_seconds() - c0) * 1000 / n


async def executor_fan_out(n: int) -> tuple[float, float]:
    executor = get_executor(Isolation.PROCESS)
    ctx = Context(run_id="bench-fan")
    t0, c0 = time.perf_counter(), _cpu_seconds()
    await asyncio.gather(*(
        executor.run_attempt(Attempt("bench-fan", "bench", f"leaf{i}", noop, 1, context=ctx,
                                     isolation=Isolation.PROCESS))
        for i in range(n)
    ))
    return n / (time.perf_counter() - t0), (_cpu_seconds() - c0) * 1000 / n


async def _runs(repeat: int, bench, n: int) -> list:
    return [await bench(n) for _ in range(repeat)]


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


async def main(args: argparse.Namespace) -> dict[str, object]:
    await launch_latency(5)  # starts the supervisor and warms the zygote
    latency = await launch_latency(args.latency_samples)
    chains = await _runs(args.repeat, executor_chain, args.n)
    fans = await _runs(args.repeat, executor_fan_out, args.n)
    engine_chains = await _runs(args.repeat, engine_chain, args.n)
    engine_fans = await _runs(args.repeat, engine_fan_out, args.n)
    result: dict[str, object] = {
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "launch_latency": latency,
        "executor_chain_states_per_s": _median([r for r, _ in chains]),
        "executor_chain_cpu_ms_per_state": round(statistics.median(c for _, c in chains), 2),
        "executor_fan_out_states_per_s": _median([r for r, _ in fans]),
        "executor_fan_out_cpu_ms_per_state": round(statistics.median(c for _, c in fans), 2),
        "chain_states_per_s": _median(engine_chains),
        "fan_out_states_per_s": _median(engine_fans),
        "fan_out_states_per_s_runs": [round(r, 1) for r in engine_fans],
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=200, help="states in the chain and the fan-out")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each throughput bench (medians)")
    figures = asyncio.run(main(parser.parse_args()))
    shutdown_supervisor()
    print(json.dumps(figures, indent=2))
