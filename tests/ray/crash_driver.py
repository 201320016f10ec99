"""A driver process for the crash test: a checkpointed chain of Ray states on a running cluster.

Each state appends "<name> <run id> <pid>" to ``DIR/effects.log`` (its side effect, fsync'd)
and then, when ``DIR/hang_<name>`` exists, waits for ever, so that the test can kill
this process at an exact point. Usage::

    python -m tests.ray.crash_driver ADDRESS DIR run
    python -m tests.ray.crash_driver ADDRESS DIR resume RUN_ID
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path

from agent import Agent, Context
from agent.checkpoint_store import SQLiteCheckpointStore

STATES = [f"step_{i}" for i in range(1, 7)]


async def step(context: Context) -> str | None:
    name = context.state_name
    directory = Path(context.get_state("dir"))
    with open(directory / "effects.log", "a") as fh:
        fh.write(f"{name} {context.run_id} {os.getpid()}\n")
        fh.flush()
        os.fsync(fh.fileno())
    context.set_state(f"{name}_done", True)
    if (directory / f"hang_{name}").exists():
        await asyncio.Event().wait()
    index = STATES.index(name)
    return STATES[index + 1] if index + 1 < len(STATES) else None


def build_agent(directory: Path) -> Agent:
    agent = Agent("ray_crash", isolation="ray", checkpoint_store=SQLiteCheckpointStore(directory / "runs.sqlite3"))
    for name, following in zip(STATES, STATES[1:] + [None]):
        agent.add_state(name, step, next_states=[following] if following else [])
    return agent


def effects(directory: Path) -> list[tuple[str, str, int]]:
    path = directory / "effects.log"
    lines = path.read_text().split("\n") if path.exists() else []
    return [(n, r, int(p)) for n, r, p in (line.split() for line in lines if line.strip())]


def counts(directory: Path) -> Counter[str]:
    return Counter(name for name, _, _ in effects(directory))


async def main(address: str, directory: Path, command: str, run_id: str | None) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    agent = build_agent(directory)
    if command == "run":
        await agent.run(initial_context={"dir": str(directory)})
    else:
        await agent.resume_run(run_id)
    print(f"finished {agent.status.value}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0], Path(args[1]), args[2], args[3] if len(args) > 3 else None))
