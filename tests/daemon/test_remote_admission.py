"""AGENT_DAEMON=1: a plain `agent run` (or Agent.run()) is admitted by agentd, sharing the box with its jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import Agentd, User, running_as, shared_file, wait_until, write_workflow

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

HOLD = '''
import asyncio, os
from agent import Agent, ResourceRequirements

agent = Agent("{name}")

async def work(context):
    out = {out!r}
    with open(out, "a") as f:
        f.write("{name} start\\n")
    while not os.path.exists({release!r}):
        await asyncio.sleep(0.05)
    with open(out, "a") as f:
        f.write("{name} end\\n")
    return None

agent.add_state("work", work, resources=ResourceRequirements(cpu_units={cpu}, memory_mb=32))
'''


def _job_holding_the_box(agentd: Agentd, ann: User, workdir: Path, outdir: Path) -> tuple[str, Path, Path]:
    """A job of ``ann`` holding both CPUs of the box (until ``outdir/job-go`` exists), and a
    script asking for one: (the job, the script, the file both write their events to)."""
    events = shared_file(outdir, "events.txt")
    agentd.configure("[pool]\ncpu = 2\n")
    agentd.start()
    job_flow = write_workflow(workdir, "job.py", HOLD.format(name="job", out=str(events),
                                                             release=str(outdir / "job-go"), cpu=2))
    script = write_workflow(workdir, "script.py", HOLD.format(name="script", out=str(events),
                                                              release=str(outdir / "job-go"), cpu=1))
    job = agentd.submit(job_flow, user=ann)
    wait_until(lambda: "job start" in events.read_text(), "the job to hold both CPUs")
    return job, script, events


def _run_through_agentd(agentd: Agentd, script: Path) -> tuple[list[str], dict[str, str]]:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "AGENT_DAEMON": "1",
           "AGENT_SOCKET": agentd.socket, "HOME": "/nonexistent"}
    return [str(Path(sys.executable).parent / "agent"), "run", "--json", str(script)], env


def test_a_script_waits_in_the_box_queue_behind_a_job(agentd: Agentd, users: tuple[User, User],
                                                      workdir: Path, outdir: Path) -> None:
    ann, bob = users
    job, script, events = _job_holding_the_box(agentd, ann, workdir, outdir)
    command, env = _run_through_agentd(agentd, script)
    with running_as(bob, command, env, workdir) as run:
        # bob's script asks agentd for a CPU; the box has none left, so it waits in agentd's queue.
        wait_until(lambda: agentd.ctl_json("top")["pool"]["waiting"] == 1, "the script's request to queue in agentd")
        assert "script start" not in events.read_text()
        (outdir / "job-go").touch()
        stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert json.loads(stdout[stdout.index("{"):])["status"] == "completed"
    assert events.read_text().splitlines() == ["job start", "job end", "script start", "script end"]
    assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"
    assert agentd.ctl_json("top")["pool"]["holders"] == 0  # the script's grant went back when it ended


def test_without_agentd_the_switch_fails_clearly(workdir: Path) -> None:
    script = write_workflow(workdir, "script.py", HOLD.format(name="script", out="/dev/null", release="/", cpu=1))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "AGENT_DAEMON": "1",
           "AGENT_SOCKET": str(workdir / "no-agentd.sock")}
    done = subprocess.run([str(Path(sys.executable).parent / "agent"), "run", str(script)], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot reach agentd at" in done.stderr and "AGENT_SOCKET" in done.stderr


def test_a_script_waiting_in_the_box_queue_when_agentd_dies_fails_saying_so(
        agentd: Agentd, users: tuple[User, User], workdir: Path, outdir: Path) -> None:
    ann, bob = users
    _, script, events = _job_holding_the_box(agentd, ann, workdir, outdir)
    command, env = _run_through_agentd(agentd, script)
    with running_as(bob, command, env, workdir) as run:
        wait_until(lambda: agentd.ctl_json("top")["pool"]["waiting"] == 1, "the script's request to queue in agentd")
        agentd.kill9()
        stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, stderr
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["status"] == "failed" and "script start" not in events.read_text()
    assert "while state 'work' waited for it to admit it" in summary["error"]  # not "was admitted"
