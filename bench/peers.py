"""Side by side with our peers, in one run: building and running new agents, and importing the package.

For each workload a new agent is built and run every time, as a service that builds a
workflow per request does: a 3-state chain and a 100-way fan-out with a join, with and
without ``ResourceRequirements`` declared on every state. Each side runs in its own
interpreter (ours: this one; puffinflow: ``--puffinflow-python``, by default this one
when it can import puffinflow), the two sides alternate, and each figure is the median
of ``--repeat`` runs; ratios are ours / theirs. ``import_ms`` is the package's own
import time from ``-X importtime``. Nothing is installed: a peer that cannot be
imported is reported as missing.

Run: ``python bench/peers.py [--repeat 5] [--seconds 1] [--puffinflow-python PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import asyncio, json, sys, time
framework, seconds = sys.argv[1], float(sys.argv[2])
if framework == "agent":
    sys.path.insert(0, sys.argv[3])
    from agent import Agent, ResourceRequirements
    def new(name): return Agent(name, isolation="inline")
    def res(): return ResourceRequirements(cpu_units=0.01, memory_mb=1.0)
    import uvloop
    run_loop = uvloop.run
else:
    from puffinflow import Agent
    from puffinflow.core.resources.requirements import ResourceRequirements
    def new(name): return Agent(name)
    def res(): return ResourceRequirements(cpu_units=0.01, memory_mb=1.0)
    run_loop = asyncio.run

def chain(with_res):
    agent = new("bench_chain")
    async def s1(context): return "s2"
    async def s2(context): return "s3"
    async def s3(context): return None
    for name, fn in (("s1", s1), ("s2", s2), ("s3", s3)):
        agent.add_state(name, fn, resources=res() if with_res else None)
    return agent

def fanout(with_res):
    agent = new("bench_fanout")
    names = [f"w{i}" for i in range(100)]
    async def start(context): return names
    async def work(context): return "join"
    async def join(context): return None
    agent.add_state("start", start, resources=res() if with_res else None)
    for name in names:
        agent.add_state(name, work, resources=res() if with_res else None)
    agent.add_state("join", join, resources=res() if with_res else None)
    return agent

async def measure(build, states):
    runs, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds or runs < 3:
        await build().run()
        runs += 1
    return runs * states / (time.perf_counter() - began)

async def main():
    out = {}
    for key, build, states in (("chain_3", chain, 3), ("fanout_100", fanout, 102)):
        for with_res in (False, True):
            await measure(lambda: build(with_res), states)  # warm up
            out[key + ("_with_resources" if with_res else "")] = await measure(lambda: build(with_res), states)
    print(json.dumps(out))

run_loop(main())
'''


def can_import(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def states_per_s(python: str, framework: str, seconds: float) -> dict[str, float]:
    proc = subprocess.run([python, "-c", WORKER, framework, str(seconds), ROOT],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def import_ms(python: str, module: str) -> float:
    """The package's cumulative import time (ms) in a fresh interpreter, from -X importtime."""
    proc = subprocess.run([python, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True,
                          check=True, cwd=ROOT if module == "agent" else None)
    for line in reversed(proc.stderr.splitlines()):
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1000
    raise RuntimeError(f"no import time for {module}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per workload and run")
    parser.add_argument("--puffinflow-python", default=sys.executable)
    args = parser.parse_args()
    out: dict[str, object] = {"python": sys.version.split()[0], "repeat": args.repeat}
    peer = args.puffinflow_python if can_import(args.puffinflow_python, "puffinflow") else None
    ours_runs, theirs_runs, ours_imports, theirs_imports = [], [], [], []
    for _ in range(args.repeat):  # alternate the two sides: the machine's speed drifts
        ours_runs.append(states_per_s(sys.executable, "agent", args.seconds))
        ours_imports.append(import_ms(sys.executable, "agent"))
        if peer:
            theirs_runs.append(states_per_s(peer, "puffinflow", args.seconds))
            theirs_imports.append(import_ms(peer, "puffinflow"))
    ours = {k: round(statistics.median(r[k] for r in ours_runs)) for k in ours_runs[0]}
    out["agent_states_per_s"] = ours
    out["agent_import_ms"] = round(statistics.median(ours_imports), 1)
    if not peer:
        out["puffinflow"] = f"not importable by {args.puffinflow_python}: pip install puffinflow==2.1.0 there"
    else:
        theirs = {k: round(statistics.median(r[k] for r in theirs_runs)) for k in theirs_runs[0]}
        out["puffinflow_states_per_s"] = theirs
        out["puffinflow_import_ms"] = round(statistics.median(theirs_imports), 1)
        out["ratio_agent_over_puffinflow"] = {k: round(ours[k] / theirs[k], 2) for k in ours}
        out["import_ratio_agent_over_puffinflow"] = round(out["agent_import_ms"] / out["puffinflow_import_ms"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
