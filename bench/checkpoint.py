"""Checkpoint costs: store write latency for a big context, and save-at-every-completion overhead.

Run: python bench/checkpoint.py [--quick]. Prints one JSON object:

* ``write_1000_keys``: latency (ms) of ``SQLiteCheckpointStore.save`` for a 1,000-key
  context where 3 keys changed since the previous save, with the caller's
  ``changed_keys`` hint, without it (every key fingerprinted), and with ``durable=True``
  (an fsync per commit);
* ``read_1000_keys``: ``latest()`` latency (ms);
* ``chain_200``: a 200-state sequential chain run with and without a store (a
  checkpoint saved at every completion), and the overhead: inline (where the save is
  all there is to measure) and with ``process`` isolation (the isolated bench's chain,
  against which the <= 10 % target is set).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import Agent  # noqa: E402
from agent.checkpoint import AgentCheckpoint  # noqa: E402
from agent.checkpoint_store import SQLiteCheckpointStore  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in samples]
    return {"p50_ms": round(percentile(ms, 0.5), 4), "p99_ms": round(percentile(ms, 0.99), 4),
            "mean_ms": round(statistics.fmean(ms), 4), "n": len(ms)}


def write_latency(directory: Path, saves: int, *, hint: bool, durable: bool) -> dict[str, float]:
    context = {f"key_{i:04d}": {"value": i, "tags": ["a", "b"], "score": i / 7} for i in range(1000)}
    completed = {f"state_{i}" for i in range(20)}
    name = f"w-{hint}-{durable}.sqlite3"
    with SQLiteCheckpointStore(directory / name, keep=20, durable=durable) as store:
        def checkpoint() -> AgentCheckpoint:
            return AgentCheckpoint("bench", "running", completed, ["next"], [], {}, context, run_id="r")

        store.save("r", checkpoint())
        samples = []
        for n in range(saves):
            changed = [f"key_{(n * 3 + j) % 1000:04d}" for j in range(3)]
            for key in changed:
                context[key] = {"value": -n, "tags": ["c"], "score": n / 3}
            cp = checkpoint()
            started = time.perf_counter()
            store.save("r", cp, changed_keys=changed if hint else None)
            samples.append(time.perf_counter() - started)
        reads = []
        for _ in range(min(saves, 200)):
            started = time.perf_counter()
            back = store.latest("r")
            reads.append(time.perf_counter() - started)
        assert back is not None and back.context == context
    result = summary(samples)
    result["read"] = summary(reads)
    return result


def chain_agent(length: int, store: SQLiteCheckpointStore | None, isolation: str = "inline") -> Agent:
    agent = Agent("bench_checkpoint_chain", isolation=isolation, checkpoint_store=store)
    names = [f"s{i:03d}" for i in range(length)]

    def make(i: int):
        following = names[i + 1] if i + 1 < length else None

        async def state(context):
            context.set_state(names[i], i)
            return following

        return state

    for i, name in enumerate(names):
        agent.add_state(name, make(i))
    return agent


async def chain_seconds(length: int, store_path: Path | None, repeats: int, isolation: str = "inline") -> list[float]:
    times = []
    for r in range(repeats):
        store = SQLiteCheckpointStore(store_path.with_name(f"{store_path.stem}-{r}.sqlite3")) if store_path else None
        agent = chain_agent(length, store, isolation)
        started = time.perf_counter()
        await agent.run()
        times.append(time.perf_counter() - started)
        if store is not None:
            store.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer samples (for CI smoke runs)")
    args = parser.parse_args()
    saves = 100 if args.quick else 1000
    repeats = 3 if args.quick else 9
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        directory = Path(tmp)
        with_hint = write_latency(directory, saves, hint=True, durable=False)
        without_hint = write_latency(directory, saves, hint=False, durable=False)
        durable = write_latency(directory, max(50, saves // 5), hint=True, durable=True)
        plain = asyncio.run(chain_seconds(200, None, repeats))
        saved = asyncio.run(chain_seconds(200, directory / "chain", repeats))
        iso_repeats = 2 if args.quick else 4
        iso_plain, iso_saved = [], []
        for r in range(iso_repeats):  # interleaved, so machine noise hits both alike
            iso_plain += asyncio.run(chain_seconds(200, None, 1, "process"))
            iso_saved += asyncio.run(chain_seconds(200, directory / f"iso{r}", 1, "process"))
    plain_s, saved_s = statistics.median(plain), statistics.median(saved)
    iso_plain_s, iso_saved_s = statistics.median(iso_plain), statistics.median(iso_saved)
    print(json.dumps({
        "bench": "checkpoint",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "write_1000_keys_3_changed": {
            "changed_keys_hint": {k: v for k, v in with_hint.items() if k != "read"},
            "no_hint_full_fingerprint": {k: v for k, v in without_hint.items() if k != "read"},
            "durable_fsync_each_commit": {k: v for k, v in durable.items() if k != "read"},
        },
        "read_latest_1000_keys": with_hint["read"],
        "chain_200_inline": {
            "executor": "inline",
            "without_store_ms": round(plain_s * 1e3, 2),
            "save_every_completion_ms": round(saved_s * 1e3, 2),
            "overhead_per_state_ms": round((saved_s - plain_s) / 200 * 1e3, 4),
            "checkpoints_per_run": 202,
        },
        "chain_200_process": {
            "executor": "process",
            "without_store_ms": round(iso_plain_s * 1e3, 1),
            "save_every_completion_ms": round(iso_saved_s * 1e3, 1),
            "overhead_percent": round((iso_saved_s - iso_plain_s) / iso_plain_s * 100, 1),
        },
    }, indent=2))


if __name__ == "__main__":
    main()
