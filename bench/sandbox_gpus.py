"""Costs of the GPU allocator, the sandbox uid pool, entering a sandbox, and agent doctor.

Prints one JSON object. Run as root: python bench/bench_sandbox_gpus.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from agent.runtime.sandbox import enter_sandbox
from agent.supervisor.doctor import diagnose
from agent.supervisor.gpus import GPUAllocator, GPUDevice, StaticInventory
from agent.supervisor.sandbox import UidPool


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p90_ms": round(samples[int(len(samples) * 0.9) - 1], 3),
        "n": repeat,
    }


def fork_and_wait(spec: dict | None) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            if spec is not None:
                enter_sandbox(spec)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
