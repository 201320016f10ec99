"""A fan-out with a join, for crash tests: start -> [a, b, c] -> merge -> end.

Usage: python fanout_workflow.py run DIR [HANG_STATE] | resume DIR RUN_ID
Each state appends its name to DIR/effects.log; HANG_STATE stops forever after its effect.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent import Agent, Context
from agent.checkpoint_store import SQLiteCheckpointStore


def build(directory: Path, hang: str | None) -> Agent:
    store = SQLiteCheckpointStore(directory / "checkpoints.sqlite3")
    agent = Agent("fanout", isolation="inline", checkpoint_store=store)

    def effect(name: str) -> None:
        with open(directory / "effects.log", "a") as f:
            f.write(name + "\n")

    def make(name: str, following):
        async def state(context: Context):
            if name == "start":
                print(f"run_id {context.run_id}", flush=True)
            effect(name)
            if name == hang:
                await asyncio.Event().wait()
            return following

        return state

    agent.add_state("start", make("start", ["a", "b", "c"]))
    for branch in "abc":
        agent.add_state(branch, make(branch, "merge"))
    agent.add_state("merge", make("merge", "end"))
    agent.add_state("end", make("end", None))
    return agent


async def main() -> None:
    directory = Path(sys.argv[2])
    if sys.argv[1] == "run":
        await build(directory, sys.argv[3] if len(sys.argv) > 3 else None).run()
    else:
        await build(directory, None).resume_run(sys.argv[3])
    print("finished", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
