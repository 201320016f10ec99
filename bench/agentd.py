"""agentd, end to end, printed as JSON (needs root: it runs a real agentd and makes 4 users).

* ``submit``: ``agentctl submit`` (a real process, as a user) to the job's first state
  running, p50 / p90 over ``--submits`` jobs one after another; ``inline`` when that
  state runs in the job's runner, ``process`` when it runs in a process of its own (the
  job's state zygote starts first). ``agentctl_ms`` is the command alone (an interpreter
  start); ``without_agentctl_ms`` submits over the socket from the bench itself (root's
  jobs): what agentd, its spawner and the runner take.
* ``queue``: ``--jobs`` (1,000) jobs of 10 states each (every state declares
  resources, so each is admitted by agentd's box-wide queue), submitted by 4 users at
  once; ``decisions_per_s`` counts agentd's admission decisions (grants and releases)
  from the first submission to the last job completed, ``jobs_per_s`` the jobs;
  ``agentd_rss_mb`` is agentd's own peak resident memory meanwhile (the spawner and
  the runners are other processes).
* ``admission``: the admission path alone: 4 clients (one per user) each keep one
  request in flight through agentd's socket (request, grant, release), so every
  decision is a round trip: ``decisions_per_s``.
* ``restart``: ``--inflight`` (100) jobs each with a state running; agentd is killed
  with SIGKILL and started again: ``resume_s`` from the new agentd's start to every
  job's state running again (completed states not re-run).

Run: ``python bench/agentd.py [--submits 20] [--jobs 1000] [--inflight 100]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.daemon import protocol  # noqa: E402

BIN = Path(sys.executable).parent
USERS = [(f"agbench-{i}", 3170 + i) for i in range(1, 5)]

FIRST = '''
import time
from agent import Agent
agent = Agent("first")
async def first(context):
    with open(context.get_state("stamp"), "w") as f:
        f.write(repr(time.time()))
    return None
agent.add_state("first", first, isolation="{isolation}")
'''

TEN = '''
from agent import Agent, ResourceRequirements
agent = Agent("ten", isolation="inline")
async def step(context):
    n = context.get_state("n", 0) + 1
    context.set_state("n", n)
    return f"s{n}" if n < 10 else None
for i in range(10):
    agent.add_state(f"s{i}", step, resources=ResourceRequirements(cpu_units=0.5, memory_mb=16))
'''

PARKED = '''
import asyncio, os
from agent import Agent
agent = Agent("parked", isolation="inline")
async def before(context):
    return "park"
async def park(context):
    with open(os.path.join(context.get_state("dir"), os.environ["AGENT_JOB"]), "a") as f:
        f.write("running\\n")
    while not os.path.exists(os.path.join(context.get_state("dir"), "go")):
        await asyncio.sleep(0.1)
    return None
agent.add_state("before", before)
agent.add_state("park", park)
'''


class Daemon:
    def __init__(self, root: Path, config: str = "") -> None:
        self.root = root
        self.socket = str(root / "agentd.sock")
        root.mkdir(exist_ok=True)
        (root / "agentd.toml").write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(BIN / "agentd"), "--socket", self.socket, "--state-dir", str(self.root / "state"),
             "--config", str(self.root / "agentd.toml")],
            stdout=open(self.root / "agentd.log", "ab"), stderr=subprocess.STDOUT)
        while True:
            try:
                with protocol.BlockingChannel(self.socket) as channel:
                    if channel.call(protocol.hello("control"))["op"] == "welcome":
                        return started
            except Exception:
                time.sleep(0.01)

    def call(self, op: str, **fields: object) -> dict:
        with protocol.BlockingChannel(self.socket) as channel:
            channel.call(protocol.hello("control"))
            return channel.call({"op": op, **fields})

    def stop(self, sig: int = 15) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait()
            self.proc = None


def as_users(fn, *args):  # type: ignore[no-untyped-def]
    """Run ``fn(*args)`` in one forked child per bench user, each become that user, all at once.

    agentd trusts peer credentials, so a client of user X must really be X. Forked from
    this (single-threaded) process before any thread starts; returns their results.
    """
    children = []
    for _, uid in USERS:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                os.setgroups([])
                os.setresgid(100, 100, 100)
                os.setresuid(uid, uid, uid)
                os.write(w, json.dumps(fn(*args)).encode())
            except BaseException as exc:  # noqa: BLE001
                os.write(w, json.dumps({"error": repr(exc)}).encode())
                code = 1
            os._exit(code)
        os.close(w)
        children.append((pid, r))
    results = []
    for pid, r in children:
        with os.fdopen(r) as f:
            results.append(json.loads(f.read()))
        os.waitpid(pid, 0)
    for result in results:
        assert "error" not in result, result
    return results


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"p50": round(statistics.median(values), 1), "p90": round(values[int(0.9 * (len(values) - 1))], 1),
            "n": len(values)}


def bench_submit(root: Path, daemon: Daemon, submits: int, user: tuple[str, int]) -> dict:
    out = {}
    name, uid = user
    stamps = root / "stamps"
    for isolation in ("inline", "process"):
        flow = root / f"first_{isolation}.py"
        flow.write_text(FIRST.format(isolation=isolation))
        flow.chmod(0o644)
        firsts, commands = [], []
        for i in range(submits):
            stamp = stamps / f"{isolation}-{i}"
            env = {"PATH": f"{BIN}:/usr/bin:/bin", "AGENT_SOCKET": daemon.socket}
            t0 = time.time()
            done = subprocess.run([str(BIN / "agentctl"), "submit", str(flow), "--param", f"stamp={stamp}"],
                                  env=env, user=uid, group=100, extra_groups=[], capture_output=True, text=True)
            commands.append((time.time() - t0) * 1000)
            assert done.returncode == 0, done.stderr
            while not (stamp.exists() and stamp.read_text()):
                time.sleep(0.001)
            firsts.append((float(stamp.read_text()) - t0) * 1000)
            job = done.stdout.strip()
            while daemon.call("status", job=job)["job"]["status"] == "running":
                time.sleep(0.01)
        out[isolation] = {"first_state_ms": percentiles(firsts), "agentctl_ms": percentiles(commands)}
        # The same through the socket from this process: what agentd, the spawner and the
        # runner take, without agentctl's own interpreter start.
        direct = []
        for i in range(submits):
            stamp = stamps / f"{isolation}-direct-{i}"
            t0 = time.time()
            with protocol.BlockingChannel(daemon.socket) as channel:
                channel.call(protocol.hello("control"))
                job = channel.call({"op": "submit", "source": flow.read_text(), "path": str(flow),
                                    "params": {"stamp": str(stamp)}})["job"]
            while not (stamp.exists() and stamp.read_text()):
                time.sleep(0.001)
            direct.append((float(stamp.read_text()) - t0) * 1000)
            while daemon.call("status", job=job)["job"]["status"] == "running":
                time.sleep(0.01)
        out[isolation]["without_agentctl_ms"] = percentiles(direct)
    return out


def _submit_many(path: str, source: str, count: int) -> list[str]:
    ids = []
    with protocol.BlockingChannel(path) as channel:
        channel.call(protocol.hello("control"))
        for _ in range(count):
            reply = channel.call({"op": "submit", "source": source, "path": "/tmp/ten.py"})
            assert reply["ok"], reply
            ids.append(reply["job"])
    return ids


def bench_queue(root: Path, jobs: int) -> dict:
    daemon = Daemon(root / "queue", "max_running_jobs = 64\n[users.default]\nmax_running_jobs = 64\n")
    daemon.start()
    import psutil

    agentd = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
    peak = [agentd.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            try:
                peak.append(agentd.memory_info().rss)
            except psutil.Error:
                return

    before = daemon.call("top")["pool"]
    started = time.perf_counter()
    as_users(_submit_many, daemon.socket, TEN, jobs // len(USERS))
    sampler = threading.Thread(target=sample, daemon=True)  # only now: the clients were forked
    sampler.start()
    submitted = time.perf_counter() - started
    while True:
        top = daemon.call("top")
        counts = [j["status"] for j in top["jobs"]]
        if all(s in ("completed", "failed", "cancelled") for s in counts) and len(counts) >= jobs:
            break
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    after = top["pool"]
    failures = sorted({str(j["error"])[:300] for j in top["jobs"] if j["status"] != "completed"})
    grants = after["granted"] - before["granted"]
    daemon.stop()
    return {
        "jobs": len(counts), "states": grants, "completed": counts.count("completed"),
        "submit_s": round(submitted, 2), "elapsed_s": round(elapsed, 2),
        "decisions_per_s": round(2 * grants / elapsed), "jobs_per_s": round(len(counts) / elapsed, 1),
        "agentd_rss_mb": round(max(peak) / 2**20, 1),
        "failures": failures[:3],
    }


def _admission_client(path: str, rounds: int) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    frames = protocol.FrameBuffer()
    pending: list[dict] = []

    def receive() -> dict:
        while not pending:
            pending.extend(frames.feed(sock.recv(65536)))
        return pending.pop(0)

    sock.sendall(protocol.encode(protocol.hello("admission")))
    assert receive()["op"] == "welcome"
    started = time.perf_counter()
    for t in range(1, rounds + 1):
        sock.sendall(protocol.encode({"op": "request", "t": t, "state": "s", "priority": 1, "front": False,
                                      "req": {"cpu": 0.5, "memory": 16.0}}))
        assert receive()["op"] == "grant"
        sock.sendall(protocol.encode({"op": "release", "t": t}))
    return {"seconds": time.perf_counter() - started}


def bench_admission(root: Path, rounds: int) -> dict:
    daemon = Daemon(root / "admission")
    daemon.start()
    results = as_users(_admission_client, daemon.socket, rounds)
    daemon.stop()
    slowest = max(r["seconds"] for r in results)
    return {"clients": len(USERS), "decisions": 2 * rounds * len(USERS),
            "decisions_per_s": round(2 * rounds * len(USERS) / slowest)}


def bench_restart(root: Path, inflight: int) -> dict:
    base = root / "restart"
    base.mkdir()
    marks = base / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    daemon = Daemon(base, f"max_running_jobs = {inflight + 10}\n[users.default]\nmax_running_jobs = {inflight}\n")
    daemon.start()
    source = PARKED
    ids = []
    with protocol.BlockingChannel(daemon.socket) as channel:
        channel.call(protocol.hello("control"))
        for _ in range(inflight):
            ids.append(channel.call({"op": "submit", "source": source, "path": "/tmp/parked.py",
                                     "params": {"dir": str(marks)}})["job"])

    def running(times: int) -> bool:
        return all((marks / j).exists() and (marks / j).read_text().count("running") >= times for j in ids)

    while not running(1):
        time.sleep(0.05)
    daemon.stop(9)
    started = daemon.start()
    while not running(2):
        time.sleep(0.02)
    resumed = time.perf_counter() - started
    (marks / "go").touch()
    while any(j["status"] not in ("completed", "failed") for j in daemon.call("list")["jobs"]):
        time.sleep(0.1)
    jobs = daemon.call("list")["jobs"]
    daemon.stop()
    return {"jobs": inflight, "resume_s": round(resumed, 2), "completed": sum(j["status"] == "completed" for j in jobs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--submits", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--only", choices=["submit", "queue", "admission", "restart"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/agentd.py needs root (agentd starts jobs as their users)")
    made = []
    for name, uid in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "-M", "-N", "-u", str(uid), "-g", "100", "-s", "/usr/sbin/nologin", name],
                           check=True)
            made.append(name)
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-", dir="/tmp"))
    root.chmod(0o755)
    (root / "stamps").mkdir()
    (root / "stamps").chmod(0o777)
    result: dict = {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 1)}
    try:
        if args.only in (None, "submit"):
            daemon = Daemon(root)
            daemon.start()
            try:
                result["submit"] = bench_submit(root, daemon, args.submits, USERS[0])
            finally:
                daemon.stop()
        if args.only in (None, "admission"):
            result["admission"] = bench_admission(root, args.rounds)
        if args.only in (None, "queue"):
            result["queue"] = bench_queue(root, args.jobs)
        if args.only in (None, "restart"):
            result["restart"] = bench_restart(root, args.inflight)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for name in made:
            subprocess.run(["userdel", name], check=False)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
