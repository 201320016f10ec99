"""Side by side with our peers, in one run (prints JSON). Nothing is installed: a peer that
cannot be imported is reported as missing.

``inline`` (against puffinflow): for each workload a new agent is built and run every
time, as a service that builds a workflow per request does: a 3-state chain and a 100-way
fan-out with a join, with and without ``ResourceRequirements`` declared on every state.
Each side runs in its own interpreter (ours: this one; puffinflow:
``--puffinflow-python``, by default this one when it can import puffinflow; give it a venv
made from this same interpreter, or the ratio compares interpreters too), the two
sides alternate, and each figure is the median of ``--repeat`` runs; ratios are ours /
theirs. ``import_ms``: what ``import PACKAGE`` and ``from PACKAGE import Agent`` import,
from ``-X importtime``.

``isolated`` (against Ray tasks): in one interpreter that imports both (``--ray-python``,
by default this one), a local Ray cluster of ``--ray-cpus`` CPUs is started and warmed
up before anything is timed; then, alternating Ray and each of our isolation levels
(``process``, ``worker``), ``--repeat`` times:

* ``fan_out``: ``--states`` no-op states returned by one inline state, through ``Agent``;
  Ray: as many no-op ``@ray.remote(num_cpus=0.01)`` tasks, gathered;
* ``chain``: ``--chain`` no-op states one after the other, through ``Agent``; Ray: the
  same number of tasks, each ``ray.get`` before the next is submitted;
* ``launch``: for ``process``, state requested (the executor called) to state running,
  from the monotonic clock every process of the box shares (p50, p90); Ray: task
  submitted to task running.

Each figure is a median; ``*_ratio`` compares ours with Ray's measured in the same run;
``cpu_ms_per_state`` is the CPU time of everything involved per state (ours: this
process, the zygote and every state process; Ray: this process and every process of the
local cluster, workers that exit meanwhile excepted), which moves less than the rates on
a loaded machine. ``load`` is the machine's load average and CPU pressure around the run.

Run: ``python bench/peers.py [--only inline|isolated] [--repeat 5] [--seconds 1]
[--states 200] [--chain 50] [--puffinflow-python PATH] [--ray-python PATH]``.
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


ISOLATED = r'''
import asyncio, json, os, statistics, sys, tempfile, time
root, repeat, states, chain_n, ray_cpus, samples = sys.argv[1], *map(int, sys.argv[2:7])
with_ray = sys.argv[7] == "1"
sys.path.insert(0, root)
sys.path.insert(0, os.path.join(root, "bench"))
os.environ.setdefault("AGENT_ECHO", "off")
import psutil
from agent import Agent
from agent.context import Context
from agent.executor import Attempt, Isolation
from agent.supervisor import current_supervisor, get_executor, shutdown_supervisor
from common import chain_agent, percentile, tree_cpu_seconds as ray_cpu  # ray_cpu: this process and the local cluster

LEVELS = ("process", "worker")

def load():
    out = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/pressure/cpu") as f:
            out["cpu_pressure_avg10"] = float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out

def our_cpu():
    """This process, the zygote, its live children and the ones it reaped."""
    own = os.times()
    total = own.user + own.system
    sup = current_supervisor()
    if sup is not None:
        zygote = psutil.Process(sup.zygote.pid)
        t = zygote.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
        for child in zygote.children():
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
    return total

async def noop(context):
    return None

async def started_at(context):
    return time.monotonic()

def fan_agent(level, n):
    names = [f"s{i}" for i in range(n)]
    async def start(context):
        return names
    agent = Agent("bench_fan", isolation=level, max_steps=n + 10)
    agent.add_state("start", start, isolation="inline", next_states=names)
    for name in names:
        agent.add_state(name, noop, next_states=[])
    return agent

async def timed(run, cpu):
    c0, t0 = cpu(), time.perf_counter()
    await run()
    return time.perf_counter() - t0, cpu() - c0

async def ours(kind, level, n):
    agent = fan_agent(level, n) if kind == "fan_out" else chain_agent("bench_chain", level, n, max_steps=n + 10)
    return await timed(agent.run, our_cpu)

def percentiles(values):
    return {"p50_ms": round(percentile(values, 0.5) * 1000, 3), "p90_ms": round(percentile(values, 0.9) * 1000, 3)}

async def our_launch(n):
    executor = get_executor(Isolation.PROCESS)
    ctx = Context(run_id="bench-launch")
    out = []
    for i in range(n):
        attempt = Attempt("bench-launch", "bench", "latency", started_at, i + 1, context=ctx,
                          isolation=Isolation.PROCESS)
        attempt.settle = set()  # as the engine runs it: the outcome comes with the result
        t0 = time.monotonic()
        outcome = await executor.run_attempt(attempt)
        out.append(outcome.result - t0)
        if attempt.settle:
            await asyncio.wait(attempt.settle)
        await asyncio.sleep(0.002)  # one launch at a time, as a chain's would be
    return out

if with_ray:
    import ray

    @ray.remote(num_cpus=0.01, max_retries=0)
    def ray_noop():
        return None

    @ray.remote(num_cpus=0.01, max_retries=0)
    def ray_started_at():
        return time.monotonic()

    async def ray_fan(n):
        return await timed(lambda: asyncio.gather(*[ray_noop.remote() for _ in range(n)]), ray_cpu)

    async def ray_chain(n):
        async def run():
            for _ in range(n):
                ray.get(ray_noop.remote())
        return await timed(run, ray_cpu)

    def ray_launch(n):
        out = []
        for _ in range(n):
            t0 = time.monotonic()
            out.append(ray.get(ray_started_at.remote()) - t0)
        return out

def summary(runs, n):
    seconds = statistics.median(t for t, _ in runs)
    return {"states_per_s": round(n / seconds, 1), "ms_per_state": round(seconds / n * 1000, 3),
            "cpu_ms_per_state": round(statistics.median(c for _, c in runs) / n * 1000, 3),
            "runs_states_per_s": [round(n / t, 1) for t, _ in runs]}

async def main():
    out = {"cpus": os.cpu_count(), "states": states, "chain_length": chain_n, "repeat": repeat,
           "load_before": load()}
    sides = list(LEVELS) + (["ray"] if with_ray else [])
    results = {kind: {side: [] for side in sides} for kind in ("fan_out", "chain")}
    # Warm up every side: the zygote, workers, Ray's workers and imports.
    for level in LEVELS:
        await ours("fan_out", level, states)
        await ours("chain", level, chain_n)
    if with_ray:
        await ray_fan(states)
        await ray_chain(chain_n)
    for _ in range(repeat):  # alternate the sides: the machine's speed drifts
        for side in sides:
            results["fan_out"][side].append(await (ray_fan(states) if side == "ray" else ours("fan_out", side, states)))
        for side in sides:
            results["chain"][side].append(await (ray_chain(chain_n) if side == "ray" else ours("chain", side, chain_n)))
    for kind, n in (("fan_out", states), ("chain", chain_n)):
        out[kind] = {side: summary(results[kind][side], n) for side in sides}
    out["launch"] = {"process": percentiles(await our_launch(samples))}
    if with_ray:
        ray_launch(10)
        out["launch"]["ray"] = percentiles(ray_launch(samples))
        ray_rate, ray_ms = out["fan_out"]["ray"]["states_per_s"], out["chain"]["ray"]["ms_per_state"]
        for level in LEVELS:
            out["fan_out"][f"{level}_over_ray"] = round(out["fan_out"][level]["states_per_s"] / ray_rate, 2)
            out["chain"][f"{level}_over_ray"] = round(out["chain"][level]["ms_per_state"] / ray_ms, 2)
    out["load_after"] = load()
    print(json.dumps(out))

if with_ray:
    temp_dir = tempfile.mkdtemp(prefix="agent-peers-ray-")
    ray.init(num_cpus=ray_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=100 * 1024 * 1024, _temp_dir=temp_dir)
try:
    asyncio.run(main())
finally:
    shutdown_supervisor()
    if with_ray:
        import shutil
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
'''


def interpreter(python: str) -> str:
    """What ``python`` is: its version and executable, which a ratio between two sides depends on
    (a distribution's optimised build and one compiled without PGO differ by a third here)."""
    proc = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0], sys.executable)"],
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def can_import(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def states_per_s(python: str, framework: str, seconds: float) -> dict[str, float]:
    proc = subprocess.run([python, "-c", WORKER, framework, str(seconds), ROOT],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def import_ms(python: str, module: str) -> dict[str, float]:
    """Import times (ms) in fresh interpreters, from -X importtime: ``import`` (``import
    PACKAGE``) and ``agent_class`` (``from PACKAGE import Agent``).

    Each is the sum of the top-level imports the statement causes, so that what a lazy
    package loads on first use of ``Agent`` counts too; the interpreter's own start-up
    imports are left out.
    """
    def top_level(code: str) -> dict[str, int]:
        proc = subprocess.run([python, "-X", "importtime", "-c", code], capture_output=True, text=True,
                              check=True, cwd=ROOT if module == "agent" else None)
        out = {}
        for line in proc.stderr.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
                out[parts[2].strip()] = int(parts[1])
        return out

    start_up = top_level("pass")
    out = {}
    for key, code in (("import", f"import {module}"), ("agent_class", f"from {module} import Agent")):
        loaded = top_level(code)
        if module not in loaded:
            raise RuntimeError(f"no import time for {module}")
        out[key] = sum(us for name, us in loaded.items() if name not in start_up) / 1000
    return out


def isolated(args: argparse.Namespace) -> dict[str, object]:
    """Our isolation levels against Ray tasks, in one interpreter that imports both (see the module doc)."""
    python = args.ray_python
    with_ray = can_import(python, "ray")
    if not with_ray:
        python = sys.executable
    proc = subprocess.run(
        [python, "-c", ISOLATED, ROOT, str(args.repeat), str(args.states), str(args.chain), str(args.ray_cpus),
         str(args.latency_samples), "1" if with_ray else "0"],
        stdout=subprocess.PIPE, text=True, check=True,
    )
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not with_ray:
        out["ray"] = f"not importable by {args.ray_python}: pip install 'ray>=2.51,<3' there"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["inline", "isolated"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per inline workload and run")
    parser.add_argument("--states", type=int, default=200, help="isolated fan-out width")
    parser.add_argument("--chain", type=int, default=50, help="isolated chain length")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--puffinflow-python", default=sys.executable)
    parser.add_argument("--ray-python", default=sys.executable)
    args = parser.parse_args()
    out: dict[str, object] = {"python": sys.version.split()[0], "repeat": args.repeat}
    if args.only != "inline":
        out["isolated"] = isolated(args)
    if args.only != "isolated":
        out["inline"] = inline(args)
    print(json.dumps(out, indent=2))


def inline(args: argparse.Namespace) -> dict[str, object]:
    """Inline agents against puffinflow's (see the module doc)."""
    out: dict[str, object] = {}
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
    out["agent_import_ms"] = {k: round(statistics.median(i[k] for i in ours_imports), 1) for k in ours_imports[0]}
    if not peer:
        out["puffinflow"] = f"not importable by {args.puffinflow_python}: pip install puffinflow==2.1.0 there"
    else:
        theirs = {k: round(statistics.median(r[k] for r in theirs_runs)) for k in theirs_runs[0]}
        out["puffinflow_states_per_s"] = theirs
        out["interpreters"] = {"agent": interpreter(sys.executable), "puffinflow": interpreter(peer)}
        theirs_import = {k: round(statistics.median(i[k] for i in theirs_imports), 1) for k in theirs_imports[0]}
        out["puffinflow_import_ms"] = theirs_import
        out["ratio_agent_over_puffinflow"] = {k: round(ours[k] / theirs[k], 2) for k in ours}
        out["import_ratio_agent_over_puffinflow"] = {
            k: round(v / theirs_import[k], 2) for k, v in out["agent_import_ms"].items()  # type: ignore[attr-defined]
        }
    return out


if __name__ == "__main__":
    main()
