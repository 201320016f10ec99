"""Cost of confining one attempt: prepare (cgroup + limits), join in a forked child, close.

Run as root: python bench/cgroups.py [--quick] [--backend v1|v2|none]. Prints one JSON
object with p50/p90 in milliseconds, next to a bare fork + exit + waitpid for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from agent.executor import Attempt, Isolation
from agent.resources import ResourceRequirements
from agent.runtime.confine import apply
from agent.supervisor.confinement import Confiner

REQUIREMENTS = ResourceRequirements(cpu_units=0.5, memory_mb=256, io_write_bps=50 * 1024 * 1024, pids_max=512)


async def _never(context):  # pragma: no cover
    return None


def _attempt(i: int) -> Attempt:
    return Attempt(
        run_id=secrets.token_hex(8),
        agent_name="bench",
        state_name="s",
        func=_never,
        number=i,
        context=None,  # type: ignore[arg-type]
        resources=REQUIREMENTS,
        isolation=Isolation.PROCESS,
    )


def _ms(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_ms": round(statistics.median(samples) * 1e3, 3),
        "p90_ms": round(samples[int(len(samples) * 0.9)] * 1e3, 3),
    }


def _fork_wait(child_spec: dict | None) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            if child_spec is not None:
                apply(child_spec)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    n = 50 if args.quick else 500
    confiner = Confiner(args.backend, gpu_minors=[])
    prepare, join, close, total, bare = [], [], [], [], []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            confinement = confiner.prepare(_attempt(i))
            t1 = time.perf_counter()
            _fork_wait(confinement.child_spec)
            t2 = time.perf_counter()
            confinement.usage()
            confinement.close()
            t3 = time.perf_counter()
            _fork_wait(None)
            t4 = time.perf_counter()
            prepare.append(t1 - t0)
            join.append(t2 - t1)
            close.append(t3 - t2)
            total.append(t3 - t0)
            bare.append(t4 - t3)
    finally:
        confiner.close()
    print(
        json.dumps(
            {
                "bench": "cgroups",
                "backend": confiner.backend_name,
                "attempts": n,
                "prepare": _ms(prepare),
                "fork_apply_wait": _ms(join),
                "fork_wait_bare": _ms(bare),
                "usage_and_close": _ms(close),
                "total": _ms(total),
            }
        )
    )


if __name__ == "__main__":
    main()
