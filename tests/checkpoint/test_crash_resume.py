"""kill -9 a real workflow process mid-run, resume it in a new one: effects of completed states happen once."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import Agent
from agent.checkpoint_store import SQLiteCheckpointStore
from agent.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("crash_resume_example", ROOT / "examples" / "crash_resume.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
STATES = example.STATES


def wait_for(predicate, proc: subprocess.Popen[str], what: str, limit: float = 60.0) -> None:
    """Poll ``predicate`` (state another process writes) until true; bounded, fails if the child exits."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert proc.poll() is None, f"the workflow exited before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.002)


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def checkpointed(directory: Path, run_id: str) -> set[str]:
    with SQLiteCheckpointStore(directory / "checkpoints.sqlite3") as store:
        cp = store.latest(run_id)
        return set(cp.completed_states) if cp is not None else set()


def resume(directory: Path, run_id: str) -> None:
    proc = example.spawn("resume", str(directory), run_id)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert out.strip().endswith("finished completed")
    with SQLiteCheckpointStore(directory / "checkpoints.sqlite3") as store:
        final = store.latest(run_id)
    assert final.agent_status == "completed"
    assert final.completed_states == set(STATES)


class TestCrashResume:
    """A run killed with SIGKILL resumes in a new process from its last completed state."""

    @pytest.mark.parametrize("kill_at", [1, 7, 13, 20])
    def test_killed_while_a_state_runs_after_its_effect(self, tmp_path, kill_at):
        name = STATES[kill_at - 1]
        proc = example.spawn("run", str(tmp_path), "--hang-after", name)
        run_id = proc.stdout.readline().split()[1]
        wait_for(lambda: example.effect_counts(tmp_path)[name] == 1, proc, f"{name}'s side effect")
        kill(proc)
        assert checkpointed(tmp_path, run_id) == set(STATES[: kill_at - 1])
        resume(tmp_path, run_id)
        counts = example.effect_counts(tmp_path)
        # Completed states ran once; the state that was running re-ran (at least once).
        assert counts == {s: 2 if s == name else 1 for s in STATES}

    @pytest.mark.parametrize("kill_at", [2, 11, 20])
    def test_killed_between_states(self, tmp_path, kill_at):
        name = STATES[kill_at - 1]
        before = set(STATES[: kill_at - 1])
        proc = example.spawn("run", str(tmp_path), "--hang-before", name)
        run_id = proc.stdout.readline().split()[1]
        wait_for(lambda: checkpointed(tmp_path, run_id) == before, proc, f"the checkpoint before {name}")
        kill(proc)
        resume(tmp_path, run_id)
        assert example.effect_counts(tmp_path) == {s: 1 for s in STATES}

    @pytest.mark.parametrize("kill_after", [3, 10, 17])
    def test_killed_at_any_moment(self, tmp_path, kill_after):
        proc = example.spawn("run", str(tmp_path))
        run_id = example.kill_after_effects(tmp_path, proc, kill_after)
        done = checkpointed(tmp_path, run_id)
        seen = example.effect_counts(tmp_path)
        assert all(seen[s] == 1 for s in done)
        resume(tmp_path, run_id)
        counts = example.effect_counts(tmp_path)
        assert all(counts[s] == 1 for s in done)  # exactly once for checkpointed completions
        rerun = [s for s in STATES if counts[s] > 1]
        assert len(rerun) <= 1 and all(counts[s] == 2 and seen[s] == 1 for s in rerun)
        assert set(counts) == set(STATES)

    def test_demo_reports_success(self):
        report = example.demo(kill_after=5)
        assert report["completed_exactly_once"] and report["every_state_ran"]
        assert report["resumed_exit_code"] == 0


class TestFanOutCrash:
    """A fan-out killed while one branch runs: finished branches stay done, the join runs once."""

    def test_kill_inside_a_fan_out(self, tmp_path):
        script = str(Path(__file__).with_name("fanout_workflow.py"))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, script, "run", str(tmp_path), "b"],
                                stdout=subprocess.PIPE, text=True, env=env)
        run_id = proc.stdout.readline().split()[1]
        wait_for(lambda: checkpointed(tmp_path, run_id) == {"start", "a", "c"}, proc, "branches a and c")
        kill(proc)
        done = subprocess.run([sys.executable, script, "resume", str(tmp_path), run_id],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        counts = example.effect_counts(tmp_path)
        assert counts == {"start": 1, "a": 1, "b": 2, "c": 1, "merge": 1, "end": 1}


FLAKY = """
import asyncio, sys
from pathlib import Path
from agent import Agent, RetryPolicy

directory = Path(sys.argv[2])

async def flaky(context):
    with open(directory / "attempts", "a") as log:
        log.write("attempt\\n")
    raise RuntimeError("the disk is full")

agent = Agent("flaky_crash", isolation="inline", checkpoint_store=directory / "checkpoints.sqlite3",
              retry_policy=RetryPolicy(max_retries=1, initial_delay=5, jitter=False))
agent.add_state("flaky", flaky)

async def main():
    if sys.argv[1] == "run":
        task = asyncio.ensure_future(agent.run())
        await asyncio.sleep(0)
        print("run", agent.run_id, flush=True)
        await task
    else:
        try:
            await agent.resume_run(sys.argv[3])
        except Exception as exc:
            print(type(exc).__name__, agent.state_metadata["flaky"].attempts)

asyncio.run(main())
"""


class TestRetriesSurviveACrash:
    """A crash during a retry delay resumes with the failed attempts counted: before, only
    completions were saved, and the state got its whole retry budget again."""

    def test_killed_while_a_retry_waits(self, tmp_path):
        script = tmp_path / "flaky.py"
        script.write_text(FLAKY)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, str(script), "run", str(tmp_path)], stdout=subprocess.PIPE,
                                text=True, env=env)
        run_id = proc.stdout.readline().split()[1]

        def first_attempt_saved() -> bool:
            with SQLiteCheckpointStore(tmp_path / "checkpoints.sqlite3") as store:
                cp = store.latest(run_id)
            return cp is not None and cp.state_metadata["flaky"]["attempts"] == 1

        wait_for(first_attempt_saved, proc, "the failed first attempt's checkpoint")
        kill(proc)
        done = subprocess.run([sys.executable, str(script), "resume", str(tmp_path), run_id],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["StateFailedError", "2"]  # its one retry, and no more
        assert (tmp_path / "attempts").read_text().count("attempt") == 2


class TestResumeCli:
    """``agent run FILE --resume RUN_ID`` continues a killed run."""

    def test_cli_resume(self, tmp_path):
        workflow = tmp_path / "workflow.py"
        workflow.write_text(
            "import os, sys\nfrom pathlib import Path\n"
            f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
            "from crash_resume import build_agent\n"
            "agent = build_agent(Path(os.environ['CRASH_DIR']), hang_after=os.environ.get('HANG_AFTER'))\n"
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT), CRASH_DIR=str(tmp_path), HANG_AFTER="step_05")
        first = subprocess.Popen([sys.executable, "-m", "agent", "run", str(workflow)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        announced = first.stderr.readline()  # the CLI names the run as it starts
        assert announced.startswith("agent run: started crash_resume, run id ")
        run_id = announced.split()[-1]
        assert first.stdout.readline().split()[1] == run_id
        first.stderr.close()
        wait_for(lambda: example.effect_counts(tmp_path)["step_05"] == 1, first, "step_05's effect")
        kill(first)
        env.pop("HANG_AFTER")
        done = subprocess.run([sys.executable, "-m", "agent", "run", str(workflow), "--resume", run_id, "--json"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert (summary["run_id"], summary["status"]) == (run_id, "completed")
        assert example.effect_counts(tmp_path) == {s: 2 if s == "step_05" else 1 for s in STATES}
        listed = subprocess.run([sys.executable, "-m", "agent", "runs", "--json", "--store",
                                 str(tmp_path / "checkpoints.sqlite3")],
                                capture_output=True, text=True, env=env, timeout=120)
        assert listed.returncode == 0, listed.stderr
        [run] = json.loads(listed.stdout)
        assert (run["run_id"], run["agent_name"], run["status"]) == (run_id, "crash_resume", "completed")
        unknown = subprocess.run([sys.executable, "-m", "agent", "run", str(workflow), "--resume", "nope"],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert unknown.returncode == 2 and "no checkpoint for run 'nope'" in unknown.stderr


class TestResumeRun:
    """Agent.resume_run checks the checkpoint against the agent before running anything."""

    async def test_checkpoint_interval_alone_uses_the_default_store(self, tmp_path, monkeypatch):
        monkeypatch.setenv("AGENT_STATE_DIR", str(tmp_path))
        agent = Agent("interval_only", checkpoint_interval=300)

        async def only(context):
            context.set_state("x", 1)

        agent.add_state("only", only)
        context = await agent.run()
        with SQLiteCheckpointStore(tmp_path / "checkpoints.sqlite3") as store:
            saved = store.latest(context.run_id)
        assert (saved.agent_status, saved.context) == ("completed", {"x": 1})
        agent.checkpoint_store.close()

    async def make(self, tmp_path: Path, name: str = "crash_resume") -> tuple[Agent, str]:
        agent = example.build_agent(tmp_path)
        agent.name = name
        ctx = await agent.run()
        return agent, ctx.run_id

    async def test_completed_run_is_not_run_again(self, tmp_path):
        agent, run_id = await self.make(tmp_path)
        again = example.build_agent(tmp_path)
        context = await again.resume_run(run_id)
        assert context.get_state("step_20_done") is not None
        assert example.effect_counts(tmp_path) == {s: 1 for s in STATES}

    async def test_a_run_this_process_still_runs_is_not_run_twice(self, tmp_path):
        import asyncio

        from agent import AgentBusyError

        store = SQLiteCheckpointStore(tmp_path / "runs.sqlite3")
        gate, ran = asyncio.Event(), []

        def build() -> Agent:
            agent = Agent("once", isolation="inline", checkpoint_store=store)

            async def first(context):
                return "second"

            async def second(context):
                ran.append("second")
                await gate.wait()

            agent.add_state("first", first)
            agent.add_state("second", second)
            return agent

        running = build()
        task = asyncio.ensure_future(running.run())
        while not ran:
            await asyncio.sleep(0.01)
        copy = build()
        with pytest.raises(AgentBusyError, match=f"run {running.run_id} is still running in this process"):
            await copy.resume_run(running.run_id)
        gate.set()
        await task
        assert ran == ["second"]
        await copy.resume_run(running.run_id)  # it ended: restored, nothing left to run
        assert ran == ["second"] and copy.status.value == "completed"
        store.close()

    async def test_unknown_run(self, tmp_path):
        with pytest.raises(CheckpointError, match="no checkpoint of run 'missing'"):
            await example.build_agent(tmp_path).resume_run("missing")

    async def test_other_agent(self, tmp_path):
        _, run_id = await self.make(tmp_path)
        other = example.build_agent(tmp_path)
        other.name = "billing"
        with pytest.raises(CheckpointError, match="belongs to agent 'crash_resume', not 'billing'"):
            await other.resume_run(run_id)

    async def test_states_that_no_longer_exist(self, tmp_path):
        _, run_id = await self.make(tmp_path)
        smaller = Agent("crash_resume", checkpoint_store=SQLiteCheckpointStore(tmp_path / "checkpoints.sqlite3"))

        async def only(context):
            return None

        smaller.add_state("step_01", only)
        with pytest.raises(CheckpointError, match="does not have"):
            await smaller.resume_run(run_id)
