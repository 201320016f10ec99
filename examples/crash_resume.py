"""Kill a workflow with SIGKILL in the middle, resume it in a new process, count side effects.

A 20-state chain; each state appends its name to an effects file (its side effect,
flushed and fsync'd) and then works a little. The agent saves a checkpoint to SQLite at
every state completion, so after ``kill -9`` a new process resumes the run: states whose
completion was checkpointed are not run again (their effect happened exactly once),
the state that was running re-runs (at-least-once, as for any crash), and the run
completes.

    python examples/crash_resume.py demo                 # kill after 7 effects, resume, check
    python examples/crash_resume.py demo --kill-after 13
    python examples/crash_resume.py run DIR [--hang-after STATE | --hang-before STATE]
    python examples/crash_resume.py resume DIR RUN_ID

``run`` prints ``run_id <id>`` as soon as the run starts. ``--hang-after`` /
``--hang-before`` make one state stop forever after / before its side effect, so a
test can kill the process at an exact point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from agent import Agent, Context
from agent.checkpoint_store import SQLiteCheckpointStore

STATES = [f"step_{i:02d}" for i in range(1, 21)]
WORK_SECONDS = 0.02  # each state's "work" after its side effect


def build_agent(directory: Path, hang_after: str | None = None, hang_before: str | None = None) -> Agent:
    """The chain, saving a checkpoint at every completion into ``directory/checkpoints.sqlite3``."""
    store = SQLiteCheckpointStore(directory / "checkpoints.sqlite3")
    agent = Agent("crash_resume", isolation="inline", checkpoint_store=store)
    effects = directory / "effects.log"

    def make_state(name: str, following: str | None):
        async def state(context: Context) -> str | None:
            if context.run_id and name == STATES[0] and context.get_state("announced") is None:
                print(f"run_id {context.run_id}", flush=True)
                context.set_state("announced", True)
            if name == hang_before:
                await asyncio.Event().wait()
            with open(effects, "a") as f:  # the side effect
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())
            context.set_state(f"{name}_done", time.time())
            if name == hang_after:
                await asyncio.Event().wait()
            await asyncio.sleep(WORK_SECONDS)
            return following

        return state

    for name, following in zip(STATES, STATES[1:] + [None]):
        agent.add_state(name, make_state(name, following))
    return agent


def effect_counts(directory: Path) -> Counter[str]:
    path = directory / "effects.log"
    return Counter(path.read_text().split()) if path.exists() else Counter()


async def _run(directory: Path, hang_after: str | None, hang_before: str | None) -> None:
    agent = build_agent(directory, hang_after, hang_before)
    await agent.run()
    print(f"finished {agent.status.value}", flush=True)


async def _resume(directory: Path, run_id: str) -> None:
    agent = build_agent(directory)
    await agent.resume_run(run_id)
    print(f"finished {agent.status.value}", flush=True)


def spawn(*args: str) -> subprocess.Popen[str]:
    """This file as a child process (the repository root on its import path)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env)


def kill_after_effects(directory: Path, proc: subprocess.Popen[str], count: int, limit: float = 30.0) -> str:
    """Wait until ``count`` side effects are on disk, SIGKILL ``proc``; returns the run id."""
    run_id = proc.stdout.readline().split()[1]  # handshake: the run has started
    deadline = time.monotonic() + limit
    try:
        while sum(effect_counts(directory).values()) < count:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the workflow ended or stalled before {count} side effects")
            time.sleep(0.002)  # polling a file written by another process
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    return run_id


def demo(kill_after: int) -> dict[str, object]:
    """Run, kill -9 after ``kill_after`` effects, resume in a new process, check the effects."""
    with tempfile.TemporaryDirectory(prefix="crash-resume-") as tmp:
        directory = Path(tmp)
        run_id = kill_after_effects(directory, spawn("run", tmp), kill_after)
        before = effect_counts(directory)
        with SQLiteCheckpointStore(directory / "checkpoints.sqlite3") as store:
            checkpointed = set(store.latest(run_id).completed_states)
        resumed = spawn("resume", tmp, run_id)
        out, _ = resumed.communicate(timeout=60)
        after = effect_counts(directory)
        report = {
            "run_id": run_id,
            "killed_after_effects": sum(before.values()),
            "completed_in_checkpoint": len(checkpointed),
            "resumed_exit_code": resumed.returncode,
            "resumed_output": out.strip(),
            "completed_exactly_once": all(after[s] == 1 for s in checkpointed),
            "rerun_after_crash": sorted(s for s in STATES if after[s] > 1),
            "every_state_ran": all(after[s] >= 1 for s in STATES),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo")
    p_demo.add_argument("--kill-after", type=int, default=7)
    p_run = sub.add_parser("run")
    p_run.add_argument("directory", type=Path)
    p_run.add_argument("--hang-after")
    p_run.add_argument("--hang-before")
    p_resume = sub.add_parser("resume")
    p_resume.add_argument("directory", type=Path)
    p_resume.add_argument("run_id")
    args = parser.parse_args(argv)
    if args.command == "demo":
        report = demo(args.kill_after)
        print(json.dumps(report, indent=2))
        ok = report["completed_exactly_once"] and report["every_state_ran"] and report["resumed_exit_code"] == 0
        return 0 if ok else 1
    if args.command == "run":
        asyncio.run(_run(args.directory, args.hang_after, args.hang_before))
    else:
        asyncio.run(_resume(args.directory, args.run_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
