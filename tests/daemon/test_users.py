"""Two real users share one agentd: each sees and steers only their own jobs; jobs run as their user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import Agentd, User, write_workflow

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

GATED = '''
import asyncio, os
from agent import Agent

agent = Agent("gated")

async def wait_for_release(context):
    print("waiting as", os.getuid(), flush=True)
    while not os.path.exists(context.get_state("release")):
        await asyncio.sleep(0.05)
    return "done"

async def done(context):
    print("done as", os.getuid())
    return None

agent.add_state("wait_for_release", wait_for_release)
agent.add_state("done", done)
'''

WHOAMI = '''
import os
from agent import Agent

agent = Agent("whoami")

def memory_cgroup():
    for line in open("/proc/self/cgroup"):
        if ":memory:" in line:
            return line.split(":", 2)[2].strip()

JOB_CONTROLLERS = {"memory", "pids", "cpu", "cpuacct", "blkio", "freezer", "devices"}

def v1_cgroups():
    """This process's cgroup in each v1 hierarchy agentd gives a job a cgroup in."""
    lines = [line.strip().split(":", 2) for line in open("/proc/self/cgroup")]
    return sorted(f"{c}={path}" for _, c, path in lines if JOB_CONTROLLERS & set(c.split(",")))

async def isolated(context):
    print(f"uid={os.getuid()} gid={os.getgid()} groups={os.getgroups()} cgroup={memory_cgroup()}")
    print("HOME=" + os.environ.get("HOME", ""), "SECRET=" + os.environ.get("AGENTD_TEST_SECRET", "none"))
    context.set_state("uid", os.getuid())
    return "inline_too"

async def inline_too(context):
    print(f"inline uid={os.getuid()}")
    with open("/proc/self/environ", "rb") as block:  # the runner's own, as the kernel keeps it
        print("ENVIRON-SECRET=" + ("root-only" if b"root-only" in block.read() else "none"))
    print(*(f"inline cgroup {line}" for line in v1_cgroups()), sep="\\n")
    return None

agent.add_state("isolated", isolated)
agent.add_state("inline_too", inline_too, isolation="inline")
'''


class TestIsolationBetweenUsers:
    """A user sees and steers only their own jobs; root sees every job."""

    def test_list_status_logs_cancel_of_another_users_job_are_refused(
        self, agentd: Agentd, users: tuple[User, User], workdir: Path
    ) -> None:
        ann, bob = users
        agentd.start()
        flow = write_workflow(workdir, "gated.py", GATED)
        release = workdir / "release"
        a = agentd.submit(flow, "--param", f"release={release}", user=ann)
        b = agentd.submit(flow, "--param", f"release={release}", "--name", "bobs", user=bob)
        agentd.wait_state(a, "wait_for_release", "running")
        agentd.wait_state(b, "wait_for_release", "running")

        assert [j["job"] for j in agentd.ctl_json("list", user=ann)] == [a]
        assert [j["job"] for j in agentd.ctl_json("list", user=bob)] == [b]
        assert {j["job"] for j in agentd.ctl_json("list")} >= {a, b}  # root sees all
        for command in (["status", b], ["logs", b], ["logs", b, "wait_for_release"], ["cancel", b],
                        ["pause", b], ["respond", b, "q1", "yes"]):
            done = agentd.ctl(*command, user=ann)
            assert done.returncode != 0, command
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "another user" in lines[0], (command, done.stderr)
            assert done.stdout == ""
        assert agentd.status(b)["status"] == "running"  # the refused cancel did nothing

        release.touch()
        for job, user in ((a, ann), (b, bob)):
            final = agentd.wait_status(job, "completed", "failed")
            assert final["status"] == "completed", final
            assert final["user"] == user.name
            assert final["states"] == {"wait_for_release": "completed", "done": "completed"}
        assert agentd.ctl("logs", a, "wait_for_release", user=ann).stdout == f"waiting as {ann.uid}\n"

    def test_unknown_job_and_bad_requests_are_one_line_refusals(self, agentd: Agentd, users: tuple[User, User],
                                                                 workdir: Path) -> None:
        ann, _ = users
        agentd.start()
        for command, code, text in ((["status", "999"], 5, "no job 999"),
                                    (["cancel", "999"], 5, "no job 999"),
                                    (["submit", str(workdir / "missing.py")], 2, "cannot read")):
            done = agentd.ctl(*command, user=ann)
            assert done.returncode == code, (command, done.returncode, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1 and text in done.stderr
        broken = write_workflow(workdir, "broken.py", "def oops(:\n")
        done = agentd.ctl("submit", str(broken), user=ann)
        assert done.returncode == 2 and "broken.py:1" in done.stderr
        flow = write_workflow(workdir, "gated.py", GATED)
        done = agentd.ctl("submit", str(flow), "--priority", "critical", user=ann)
        assert done.returncode == 4 and "ceiling" in done.stderr
        done = agentd.ctl("submit", str(flow), "--priority", "bogus", user=ann)
        assert done.returncode == 2 and "unknown priority 'bogus'" in done.stderr  # bad input, not a conflict
        too_many = [arg for i in range(300) for arg in ("--param", f"p{i}=1")]
        done = agentd.ctl("submit", str(flow), *too_many, user=ann)
        assert done.returncode == 2 and "params must be a map of at most 256" in done.stderr
        garbled = workdir / "garbled.py"
        garbled.write_bytes(b'x = "\xff\xfe"\n')
        garbled.chmod(0o644)
        done = agentd.ctl("submit", str(garbled), user=ann)
        assert done.returncode == 2 and "save it as UTF-8" in done.stderr and "Traceback" not in done.stderr
        assert agentd.ctl_json("list", user=ann) == []

    @pytest.mark.parametrize("ending", ["await agent.run()", "agent.run_sync()"])
    def test_a_file_as_agent_run_takes_it(self, agentd: Agentd, users: tuple[User, User], workdir: Path,
                                          ending: str) -> None:
        """The Quick Start as written (top-level await), in Latin-1 with its coding line, runs once."""
        ann, _ = users
        agentd.start()
        source = ("# -*- coding: latin-1 -*-\nfrom agent import Agent\nagent = Agent('caf\xe9')\n"
                  "async def greet(context):\n    print('hello from caf\xe9')\n"
                  f"agent.add_state('greet', greet, isolation='inline')\n{ending}\n")
        flow = workdir / "quick.py"
        flow.write_bytes(source.encode("latin-1"))
        flow.chmod(0o644)
        job = agentd.submit(flow, user=ann)
        final = agentd.wait_status(job, "completed", "failed")
        assert final["status"] == "completed", final
        assert agentd.ctl("logs", job, user=ann).stdout.count("hello from caf\xe9") == 1


class TestJobsRunAsTheirUser:
    """A job's runner and every state process run as the submitting uid, in the job's cgroup."""

    def test_state_processes_run_as_the_submitter(self, agentd: Agentd, users: tuple[User, User],
                                                  workdir: Path) -> None:
        ann, _ = users
        agentd.env["AGENTD_TEST_SECRET"] = "root-only"
        agentd.start()
        job = agentd.submit(write_workflow(workdir, "whoami.py", WHOAMI), user=ann)
        final = agentd.wait_status(job, "completed", "failed")
        assert final["status"] == "completed", final
        out = agentd.ctl("logs", job, "isolated", user=ann).stdout
        assert f"uid={ann.uid} gid={ann.gid} groups=[{ann.gid}]" in out
        assert f"/agentd/{agentd.pid}-" in out and f"/job-{job}/" in out  # below the job's delegated cgroup
        assert "SECRET=none" in out  # the environment is the job's, not agentd's
        runner_log = agentd.ctl("logs", job, user=ann).stdout
        assert f"inline uid={ann.uid}" in runner_log  # inline states run in the runner, as the user too
        assert "ENVIRON-SECRET=none" in runner_log  # nor is agentd's left in its process's memory
        runner_cgroups = [line for line in runner_log.splitlines() if line.startswith("inline cgroup ")]
        assert runner_cgroups and all(f"/agentd/{agentd.pid}-" in line and line.endswith(f"/job-{job}")
                                      for line in runner_cgroups), runner_cgroups  # in every hierarchy

    def test_json_interface(self, agentd: Agentd, users: tuple[User, User], workdir: Path) -> None:
        ann, _ = users
        agentd.start()
        flow = write_workflow(workdir, "whoami.py", WHOAMI)
        submitted = json.loads(agentd.ctl("submit", str(flow), "--json", user=ann).stdout)
        job = submitted["job"]
        agentd.wait_status(job, "completed", "failed")
        status = agentd.status(job, user=ann)
        assert {"job", "user", "status", "states"} <= set(status)
        assert status["job"] == job and status["user"] == ann.name and status["status"] == "completed"
        assert status["states"] == {"isolated": "completed", "inline_too": "completed"}
        listed = agentd.ctl_json("list", user=ann)
        assert [j["job"] for j in listed] == [job] and listed[0]["states"] == status["states"]


INHERITS = '''
import os, textwrap
from agent import Agent

textwrap.loaded_by_the_workflow_in = os.getpid()  # module state set by the workflow file itself

agent = Agent("inherits")

async def look(context):
    print("inherited:", getattr(textwrap, "loaded_by_the_workflow_in", None) is not None, os.getpid())
    return None

agent.add_state("look", look)
'''


def test_state_processes_fork_from_the_loaded_workflow(agentd: Agentd, users: tuple[User, User],
                                                       workdir: Path) -> None:
    """On cgroup v1 the job's zygote is a fork of its runner: states inherit the workflow's imports."""
    ann, _ = users
    agentd.start()
    job = agentd.submit(write_workflow(workdir, "inherits.py", INHERITS), user=ann)
    assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"
    out = agentd.ctl("logs", job, "look", user=ann).stdout
    assert out.startswith("inherited: True"), out
