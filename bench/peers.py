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
from ``-X importtime``. ``agent_compiled`` names the engine modules this checkout runs
compiled (``setup.py``; none: pure Python, about 1.5x slower per state).

``isolated`` (against Ray tasks): each side runs in an interpreter of its own, started
and warmed up before anything is timed, which then runs what the bench asks, one
workload at a time: ours (this interpreter, which never imports Ray) and Ray's
(``--ray-python``, by default this one: it starts a local Ray cluster of ``--ray-cpus``
CPUs, which stays up while ours is timed). Ray's driver keeps threads of its own busy in
its process; in ours they took the GIL and the CPU from the supervisor (a ``worker`` chain
took a quarter longer beside them). Alternating Ray and each of our isolation levels
(``process``, ``worker``), ``--repeat`` times:

* ``fan_out``: ``--states`` no-op states returned by one inline state, through ``Agent``;
  Ray: as many no-op ``@ray.remote(num_cpus=0.01)`` tasks, gathered;
* ``chain``: ``--chain`` no-op states one after the other, through ``Agent``; Ray: the
  same number of tasks, each ``ray.get`` before the next is submitted;
* ``busy_chain``: the same chain, each state waiting ``--busy-ms`` ms first (as a state
  waiting on a service does; Ray's task sleeps as long), so that the machine's cores are
  free between transitions: ``overhead_ms_per_state`` is the time per state beyond that
  wait, what a chain of real states pays for its isolation;
* ``launch``: for ``process``, state requested (the executor called) to state running,
  from the monotonic clock every process of the box shares (p50, p90); Ray: task
  submitted to task running.
* ``fork_floor``: a process made as the zygote is (its imports, warmed up, collected,
  frozen) forks a child and waits for it, ``--chain`` times; the child exits at once
  (``exit``), or first serves one whole attempt as a state's process does, its
  supervisor's messages read from a socketpair (``one_attempt``, the zygote's warm-up
  round): wall, CPU (parent and child) and the child's minor faults per fork. No level
  that makes a fresh process per state goes below ``one_attempt``; ``process`` also
  pays for the cgroups of each state and for the supervisor's side.

Each workload is timed on a quiet machine: before each, the bench waits until the cores
have been idle (under 15% busy) for ``--quiet-s`` seconds, at most 10 s (``settle``:
how long it waited in all, and how often it gave up). Work a side leaves running is
otherwise timed as the next one's: Ray stops the workers a fan-out started about a
second after it, and a side timed while that ran took up to 1.7x as long.
Each figure is a median; ``*_over_ray`` compares ours with Ray's measured in the same run;
``cpu_ms_per_state`` is the CPU time of everything involved per state (ours: our side's
process, the zygote and every state process; Ray: its driver and every process of the
local cluster, workers that exit meanwhile excepted), which moves less than the rates on
a loaded machine; ``cpu_ms_per_state_by_process`` splits it (ours: ``supervisor``, the
``zygote``, ``state_processes``; Ray: ``driver``, ``cluster``). ``load`` is the machine's
load average and CPU pressure around the run.

Run: ``python bench/peers.py [--only inline|isolated] [--repeat 5] [--seconds 1]
[--states 200] [--chain 50] [--busy-ms 20] [--quiet-s 1] [--puffinflow-python PATH]
[--ray-python PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

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
import asyncio, json, os, sys, tempfile, time
import psutil
root, side, states, chain_n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ray_cpus, samples, busy_s = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]) / 1000
sys.path.insert(0, root)
sys.path.insert(0, os.path.join(root, "bench"))
os.environ.setdefault("AGENT_ECHO", "off")
from common import chain_agent, launch_latencies, percentile

def percentiles(values):
    return {"p50_ms": round(percentile(values, 0.5) * 1000, 3), "p90_ms": round(percentile(values, 0.9) * 1000, 3)}

async def timed(run, cpu):
    """Seconds, CPU seconds in all, and CPU seconds by process (``cpu()``'s parts)."""
    c0, t0 = cpu(), time.perf_counter()
    await run()
    seconds, c1 = time.perf_counter() - t0, cpu()
    parts = {part: c1[part] - c0.get(part, 0.0) for part in c1}
    return [seconds, sum(parts.values()), parts]

def cpu_times(proc):
    try:
        t = proc.cpu_times()
    except psutil.Error:  # gone meanwhile
        return 0.0
    return t.user + t.system

if side == "ours":
    from agent import Agent
    from agent.supervisor import current_supervisor, shutdown_supervisor

    def our_cpu():
        """CPU seconds so far of this process (the supervisor's), the zygote, and the state
        processes and workers (live, and those the zygote reaped)."""
        own = os.times()
        parts = {"supervisor": own.user + own.system, "zygote": 0.0, "state_processes": 0.0}
        sup = current_supervisor()
        if sup is not None:
            zygote = psutil.Process(sup.zygote.pid)
            t = zygote.cpu_times()
            parts["zygote"] = t.user + t.system
            parts["state_processes"] = t.children_user + t.children_system + sum(map(cpu_times, zygote.children()))
        return parts

    async def noop(context):
        return None

    def fan_agent(level, n):
        names = [f"s{i}" for i in range(n)]
        async def start(context):
            return names
        agent = Agent("bench_fan", isolation=level, max_steps=n + 10)
        agent.add_state("start", start, isolation="inline", next_states=names)
        for name in names:
            agent.add_state(name, noop, next_states=[])
        return agent

    async def fan_out(level):
        return await timed(fan_agent(level, states).run, our_cpu)

    async def chain(level, busy=0.0):
        return await timed(chain_agent("bench_chain", level, chain_n, busy, max_steps=chain_n + 10).run, our_cpu)

    async def busy_chain(level):
        return await chain(level, busy_s)

    async def launch(_):
        return percentiles(await launch_latencies(samples))

    async def warm_up():
        for level in ("process", "worker"):
            await fan_out(level)
            await chain(level)

    def close():
        shutdown_supervisor()
else:
    import ray

    temp_dir = tempfile.mkdtemp(prefix="agent-peers-ray-")
    ray.init(num_cpus=ray_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=100 * 1024 * 1024, _temp_dir=temp_dir)

    def ray_cpu():
        """CPU seconds so far of this process (Ray's driver) and its cluster's live processes."""
        me = psutil.Process()
        return {"driver": cpu_times(me), "cluster": sum(map(cpu_times, me.children(recursive=True)))}

    @ray.remote(num_cpus=0.01, max_retries=0)
    def ray_noop():
        return None

    @ray.remote(num_cpus=0.01, max_retries=0)
    def ray_started_at():
        return time.monotonic()

    @ray.remote(num_cpus=0.01, max_retries=0)
    def ray_busy(seconds):
        time.sleep(seconds)

    async def fan_out(_):
        return await timed(lambda: asyncio.gather(*[ray_noop.remote() for _ in range(states)]), ray_cpu)

    async def chain(_):
        async def run():
            for _ in range(chain_n):
                ray.get(ray_noop.remote())
        return await timed(run, ray_cpu)

    async def busy_chain(_):
        async def run():
            for _ in range(chain_n):
                ray.get(ray_busy.remote(busy_s))
        return await timed(run, ray_cpu)

    async def launch(_):
        out = []
        for _ in range(10 + samples):
            t0 = time.monotonic()
            out.append(ray.get(ray_started_at.remote()) - t0)
        return percentiles(out[10:])

    async def warm_up():
        await fan_out(None)
        await chain(None)

    def close():
        import shutil
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

async def serve():
    # Commands from the bench, one per line ("fan_out LEVEL", "chain LEVEL", "busy_chain LEVEL",
    # "launch"), each
    # answered with one JSON line; the event loop keeps running while a command is awaited.
    await warm_up()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    handlers = {"fan_out": fan_out, "chain": chain, "busy_chain": busy_chain, "launch": launch}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            return
        kind, _, level = line.strip().partition(" ")
        print(json.dumps(await handlers[kind](level or None)), flush=True)

try:
    asyncio.run(serve())
finally:
    close()
'''


FORK_FLOOR = r'''
import gc, json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from agent.runtime import zygote
zygote.warm_up()
gc.collect()
gc.freeze()
zygote._release_free_heap()
n = int(sys.argv[2])

def forks(child):
    c0, w0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
    t0 = time.perf_counter()
    for _ in range(n):
        pid = zygote._libc_fork()
        if pid == 0:
            try:
                child()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    seconds = time.perf_counter() - t0
    c1, w1 = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
    in_child = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    in_parent = w1.user + w1.system - w0.user - w0.system
    return {"ms_per_fork": round(seconds / n * 1000, 3), "cpu_ms_per_fork": round((in_parent + in_child) / n * 1000, 3),
            "child_minor_faults": round((c1.ru_minflt - c0.ru_minflt) / n)}

out = {"exit": forks(lambda: None), "one_attempt": forks(lambda: zygote.warm_up(1))}
with open("/proc/self/status") as f:
    out["rss_mib"] = round(next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024, 1)
print(json.dumps(out))
'''


def fork_floor(n: int) -> dict[str, Any]:
    """What a fresh process costs here before any cgroup or supervisor (``FORK_FLOOR``, the module doc)."""
    done = subprocess.run([sys.executable, "-c", FORK_FLOOR, ROOT, str(n)], capture_output=True, text=True,
                          check=True, timeout=300)
    floor: dict[str, Any] = json.loads(done.stdout)
    return floor


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


class _Side:
    """One side of the isolated comparison: an interpreter running ``ISOLATED`` that warms
    up, then answers the bench's commands one line at a time."""

    def __init__(self, python: str, side: str, args: argparse.Namespace) -> None:
        self.proc = subprocess.Popen(
            [python, "-c", ISOLATED, ROOT, side, str(args.states), str(args.chain), str(args.ray_cpus),
             str(args.latency_samples), str(args.busy_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def ready(self) -> None:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            raise RuntimeError(f"a bench side did not start (exit status {self.proc.wait()})")

    def ask(self, command: str) -> Any:
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"a bench side ended during {command!r} (exit status {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait()


def _summary(runs: list[list[Any]], n: int) -> dict[str, object]:
    seconds = statistics.median(t for t, _, _ in runs)
    return {"states_per_s": round(n / seconds, 1), "ms_per_state": round(seconds / n * 1000, 3),
            "cpu_ms_per_state": round(statistics.median(c for _, c, _ in runs) / n * 1000, 3),
            "cpu_ms_per_state_by_process": {part: round(statistics.median(p[part] for _, _, p in runs) / n * 1000, 3)
                                            for part in runs[0][2]},
            "runs_states_per_s": [round(n / t, 1) for t, _, _ in runs]}


def _load() -> dict[str, object]:
    out: dict[str, object] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/pressure/cpu") as f:
            out["cpu_pressure_avg10"] = float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


def _settle(quiet_s: float, most_s: float = 10.0, busy_pct: float = 15.0) -> tuple[float, bool]:
    """Wait until the cores have been under ``busy_pct`` busy for ``quiet_s`` seconds in a row
    (at most ``most_s``); how long it waited, and whether it gave up."""
    import psutil

    start = time.monotonic()
    quiet_since = start
    while time.monotonic() - quiet_since < quiet_s:
        if time.monotonic() - start > most_s:
            return time.monotonic() - start, True
        if psutil.cpu_percent(interval=0.1) >= busy_pct:
            quiet_since = time.monotonic()
    return time.monotonic() - start, False


def isolated(args: argparse.Namespace) -> dict[str, object]:
    """Our isolation levels against Ray tasks, each side in its own interpreter (see the module doc)."""
    with_ray = can_import(args.ray_python, "ray")
    out: dict[str, object] = {"cpus": os.cpu_count(), "states": args.states, "chain_length": args.chain,
                              "repeat": args.repeat, "load_before": _load()}
    ours = _Side(sys.executable, "ours", args)
    ray = _Side(args.ray_python, "ray", args) if with_ray else None
    try:
        ours.ready()
        if ray is not None:
            ray.ready()  # Ray's cluster is up and warm from here on, also while ours is timed
        sides = ["process", "worker"] + (["ray"] if ray is not None else [])

        settle = {"waited_s": 0.0, "gave_up": 0}

        def ask(side: str, kind: str) -> Any:
            waited, gave_up = _settle(args.quiet_s)
            settle["waited_s"] += waited
            settle["gave_up"] += gave_up
            return ray.ask(kind) if side == "ray" else ours.ask(f"{kind} {side}")  # type: ignore[union-attr]

        kinds = {"fan_out": args.states, "chain": args.chain, "busy_chain": args.chain}
        results: dict[str, dict[str, list[Any]]] = {kind: {side: [] for side in sides} for kind in kinds}
        for _ in range(args.repeat):  # alternate the sides: the machine's speed drifts
            for kind in kinds:
                for side in sides:
                    results[kind][side].append(ask(side, kind))
        for kind, n in kinds.items():
            out[kind] = {side: _summary(results[kind][side], n) for side in sides}
        for summary in out["busy_chain"].values():  # type: ignore[attr-defined]
            summary["overhead_ms_per_state"] = round(summary["ms_per_state"] - args.busy_ms, 3)
        out["busy_ms"] = args.busy_ms
        out["settle"] = {"waited_s": round(settle["waited_s"], 1), "gave_up": settle["gave_up"]}
        _settle(args.quiet_s)
        launch = {"process": ours.ask("launch")}
        if ray is not None:
            _settle(args.quiet_s)
            launch["ray"] = ray.ask("launch")
        out["launch"] = launch
        _settle(args.quiet_s)
        out["fork_floor"] = fork_floor(args.chain)
    finally:
        ours.close()
        if ray is not None:
            ray.close()
    out["load_after"] = _load()
    out["interpreters"] = {"agent": interpreter(sys.executable)}
    if ray is None:
        out["ray"] = f"not importable by {args.ray_python}: pip install 'ray>=2.51,<3' there"
        return out
    out["interpreters"]["ray"] = interpreter(args.ray_python)  # type: ignore[index]
    fan_out, chain, busy = out["fan_out"], out["chain"], out["busy_chain"]
    for level in ("process", "worker"):
        fan_out[f"{level}_over_ray"] = round(  # type: ignore[index]
            fan_out[level]["states_per_s"] / fan_out["ray"]["states_per_s"], 2)  # type: ignore[index]
        chain[f"{level}_over_ray"] = round(  # type: ignore[index]
            chain[level]["ms_per_state"] / chain["ray"]["ms_per_state"], 2)  # type: ignore[index]
        busy[f"{level}_over_ray"] = round(  # type: ignore[index]
            busy[level]["overhead_ms_per_state"] / busy["ray"]["overhead_ms_per_state"], 2)  # type: ignore[index]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["inline", "isolated"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per inline workload and run")
    parser.add_argument("--states", type=int, default=200, help="isolated fan-out width")
    parser.add_argument("--chain", type=int, default=50, help="isolated chain length")
    parser.add_argument("--busy-ms", type=float, default=20.0, help="what each state of busy_chain waits")
    parser.add_argument("--quiet-s", type=float, default=1.0, help="idle cores before each isolated workload")
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


def compiled_modules() -> list[str]:
    """The engine modules this checkout runs compiled (setup.py); none: pure Python."""
    sys.path.insert(0, ROOT)
    from agent._compiled import COMPILED, compiled_path

    return [module for module in COMPILED if compiled_path(module) is not None]


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
    out["agent_compiled"] = compiled_modules()
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
