"""Costs of the GPU allocator, the sandbox uid pool, entering a sandbox, and agent doctor.

``*_noop_state``: a no-op state run end to end through the executor, as the scheduler
runs it (uid lease, cgroup, fork, sandbox, handshake, result; then the clean-up, which the
next state does not wait for), for ``process`` and ``sandbox``. Prints one JSON object. Run as root:
python bench/sandbox_gpus.py
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from agent.context import Context
from agent.executor import Attempt, Isolation
from agent.runtime.sandbox import enter_sandbox
from agent.supervisor import get_executor, shutdown_supervisor
from agent.supervisor.doctor import diagnose
from agent.supervisor.gpus import GPUAllocator, GPUDevice, StaticInventory
from agent.supervisor.sandbox import UidPool


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return {**percentiles(samples), "n": repeat}


def fork_and_wait(spec: dict | None) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            if spec is not None:
                enter_sandbox(spec)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


async def noop(context: Context) -> None:
    return None


async def noop_states(isolation: Isolation, repeat: int) -> dict[str, float]:
    """``repeat`` no-op attempts one after the other (after 5 to warm up), as the engine runs
    them: ``p50_ms`` until the outcome is in the scheduler's hands (the next state may
    start), ``settled_p50_ms`` until the attempt's process, cgroup and uid are gone too."""
    executor = get_executor(isolation)
    ctx = Context(run_id="bench")
    outcome, settled = [], []
    for i in range(repeat + 5):
        attempt = Attempt("bench", "bench", "noop", noop, i + 1, context=ctx, isolation=isolation)
        attempt.settle = set()
        start = time.perf_counter()
        await executor.run_attempt(attempt)
        outcome.append((time.perf_counter() - start) * 1000)
        if attempt.settle:
            await asyncio.wait(attempt.settle)
        settled.append((time.perf_counter() - start) * 1000)
    return {**percentiles(outcome[5:]), "settled_p50_ms": percentiles(settled[5:])["p50_ms"], "n": repeat}


def percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"p50_ms": round(statistics.median(samples), 3), "p90_ms": round(samples[int(len(samples) * 0.9) - 1], 3)}


def main() -> None:
    gpus = [GPUDevice(i, f"GPU-{i}", "bench", 81920, f"0000:{i:02x}:00.0", i) for i in range(8)]
    alloc = GPUAllocator(StaticInventory(gpus))

    def gpu_cycle() -> None:
        for i in range(16):
            alloc.allocate(f"o{i}", 0.25 if i % 2 else 1)
        for i in range(16):
            alloc.release(f"o{i}")

    pool = UidPool()
    lease = pool.lease("bench-enter")
    spec = lease.spec()
    out = {
        "gpu_allocate_release_us": round(timed(gpu_cycle, 200)["p50_ms"] * 1000 / 32, 2),
        "uid_lease_release": timed(lambda: (pool.lease("bench"), pool.release("bench")), 50),
        "fork_exit_baseline": timed(lambda: fork_and_wait(None), 50),
        "fork_enter_sandbox_exit": timed(lambda: fork_and_wait(spec), 50),
        "doctor_diagnose": timed(diagnose, 5),
    }
    pool.close()
    out["process_noop_state"] = asyncio.run(noop_states(Isolation.PROCESS, 100))
    out["sandbox_noop_state"] = asyncio.run(noop_states(Isolation.SANDBOX, 100))
    shutdown_supervisor()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
