"""Saves checkpoints of one run as fast as it can, printing each sequence number.

Step ``n`` sets ``k{n % 100}`` and ``n`` to ``n`` and its completed state to ``s{n}``, so any
checkpoint read back can be checked for being one whole step (see ``expected_context``).
Usage: python store_writer.py DB_PATH RUN_ID FIRST_STEP
"""

from __future__ import annotations

import sys

from agent.checkpoint import AgentCheckpoint
from agent.checkpoint_store import SQLiteCheckpointStore


def expected_context(n: int) -> dict[str, int]:
    context = {f"k{i}": 0 for i in range(100)}
    for m in range(max(1, n - 99), n + 1):
        context[f"k{m % 100}"] = m
    context["n"] = n
    return context


def main() -> None:
    path, run_id, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = SQLiteCheckpointStore(path, keep=5)
    context = expected_context(first - 1)
    n = first
    while True:
        context[f"k{n % 100}"] = n
        context["n"] = n
        cp = AgentCheckpoint("writer", "running", {f"s{n}"}, [], [], {}, context, run_id=run_id)
        seq = store.save(run_id, cp, changed_keys=[f"k{n % 100}", "n"])
        print(n, seq, flush=True)
        n += 1


if __name__ == "__main__":
    main()
