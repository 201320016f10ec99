"""kill -9 agentd in the middle of a job, start it again: the job resumes from its last checkpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from .helpers import AGENTD, Agentd, User, processes_of, status_sockets_of, wait_until, write_workflow

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CHAIN = '''
import asyncio, os
from agent import Agent

agent = Agent("chain")

def note(context, name):
    with open(context.get_state("out"), "a") as f:
        f.write(f"{name} {os.getpid()}\\n")

async def s1(context):
    note(context, "s1")
    context.set_state("progress", ["s1"])
    return "s2"

async def s2(context):
    note(context, "s2")
    context.set_state("progress", context.get_state("progress") + ["s2"])
    return "s3"

async def s3(context):
    note(context, "s3")
    while not os.path.exists(context.get_state("release")):
        await asyncio.sleep(0.05)
    context.set_state("progress", context.get_state("progress") + ["s3"])
    return "s4"

async def s4(context):
    note(context, "s4")
    print("progress", context.get_state("progress"))
    return None

for name in ("s1", "s2", "s3", "s4"):
    agent.add_state(name, globals()[name])
'''


def _start_chain(agentd: Agentd, workdir: Path, out: Path, user: User) -> str:
    """agentd started, the chain submitted by ``user``, and its s3 running."""
    agentd.start()
    job = agentd.submit(write_workflow(workdir, "chain.py", CHAIN), "--param", f"out={out / 'runs.txt'}",
                        "--param", f"release={out / 'go'}", user=user)
    agentd.wait_state(job, "s3", "running")
    return job


class TestCrashAndResume:
    """agentd killed outright leaves no process behind; the next one resumes the job."""

    def test_a_runner_killed_outright_fails_its_job_and_its_running_state(
        self, agentd: Agentd, users: tuple[User, User], workdir: Path, outdir: Path,
    ) -> None:
        ann, _ = users
        job = _start_chain(agentd, workdir, outdir, ann)
        os.kill(agentd.status(job)["pid"], signal.SIGKILL)
        final = agentd.wait_status(job, "failed")
        assert "its runner was killed by SIGKILL" in final["error"]
        assert final["states"]["s3"] == "failed" and final["states"]["s2"] == "completed"
        wait_until(lambda: not processes_of({ann.uid}), "the killed runner's processes to go", timeout=30)

    def test_a_runner_stopped_past_its_cancel_grace_leaves_no_state_running(
        self, agentd: Agentd, users: tuple[User, User], workdir: Path, outdir: Path,
    ) -> None:
        # Killed after the grace without a word: its states kept reading "running" for good.
        ann, _ = users
        job = _start_chain(agentd, workdir, outdir, ann)
        runner = agentd.status(job)["pid"]
        os.kill(runner, signal.SIGSTOP)
        try:
            cancelled = agentd.ctl_json("cancel", job, user=ann)  # answers once the runner is gone
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(runner, signal.SIGCONT)
        assert cancelled["status"] == "cancelled"
        assert cancelled["states"]["s3"] == "cancelled" and cancelled["states"]["s2"] == "completed"
        assert "running" not in cancelled["states"].values()
        wait_until(lambda: not processes_of({ann.uid}), "the stopped runner's processes to go", timeout=30)

    def test_kill_9_mid_job_then_restart(self, agentd: Agentd, users: tuple[User, User], workdir: Path,
                                         outdir: Path) -> None:
        ann, _ = users
        runs = outdir / "runs.txt"
        job = _start_chain(agentd, workdir, outdir, ann)
        wait_until(lambda: runs.exists() and "s3" in runs.read_text(), "s3 to start")
        old_dirs = agentd.incarnation_dirs()
        assert any(os.path.isdir(f"{d}/job-{job}") for d in old_dirs)
        assert processes_of({ann.uid}), "the job's runner and state process run as ann"

        agentd.kill9()
        # The runner, its zygote and the state's process die with agentd (parent-death signals).
        wait_until(lambda: not processes_of({ann.uid}), "the job's processes to die with agentd", timeout=30)
        assert all(os.path.isdir(d) for d in old_dirs)  # nobody cleaned up: the next agentd will

        agentd.start()
        assert not [d for d in old_dirs if os.path.exists(d)], "the dead agentd's cgroups were not reaped"
        wait_until(lambda: [line.split()[0] for line in runs.read_text().splitlines()].count("s3") == 2,
                   "s3 to run again after the restart")
        status = agentd.status(job, user=ann)
        assert status["status"] == "running" and status["starts"] == 2
        assert status["states"]["s1"] == "completed" and status["states"]["s2"] == "completed"
        (outdir / "go").touch()
        final = agentd.wait_status(job, "completed", "failed")
        assert final["status"] == "completed", final
        assert [line.split()[0] for line in runs.read_text().splitlines()] == ["s1", "s2", "s3", "s3", "s4"]
        assert "progress ['s1', 's2', 's3']" in agentd.ctl("logs", job, "s4", user=ann).stdout

    def test_a_clean_stop_keeps_running_jobs_for_the_next_start(self, agentd: Agentd, users: tuple[User, User],
                                                                 workdir: Path, outdir: Path) -> None:
        ann, _ = users
        runs = outdir / "runs.txt"
        sockets_before = set(status_sockets_of(ann.uid))  # a runner killed outright cannot remove its own
        job = _start_chain(agentd, workdir, outdir, ann)
        # Every user's jobs are in the database: it and its WAL files are root's alone.
        database = os.path.join(agentd.state_dir, "agentd.sqlite3")
        files = [f for f in (database, f"{database}-wal", f"{database}-shm") if os.path.exists(f)]
        assert len(files) == 3 and {oct(os.stat(f).st_mode & 0o777) for f in files} == {"0o600"}
        dirs = agentd.incarnation_dirs()
        assert agentd.stop() == 0
        assert not [d for d in dirs if os.path.exists(d)]
        assert not os.path.exists(os.path.join(agentd.state_dir, "jobs", job, "tmp"))  # as a runner's end empties it
        wait_until(lambda: not processes_of({ann.uid}), "the job's processes to stop with agentd", timeout=30)
        (outdir / "go").touch()
        agentd.start()
        assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"
        assert [line.split()[0] for line in runs.read_text().splitlines()] == ["s1", "s2", "s3", "s3", "s4"]
        # The runners (one stopped with agentd, one that finished) left no status socket.
        wait_until(lambda: not processes_of({ann.uid}) and set(status_sockets_of(ann.uid)) <= sockets_before,
                   "the job's runners to exit and their status sockets to go", timeout=30)


class TestStandbyRunner:
    """agentd's spawner forks the next runner ahead of time; that standby goes with agentd."""

    @staticmethod
    def _tree(agentd: Agentd) -> list[psutil.Process]:
        """The spawner and its standby runner (agentd's descendants, none of them a job's yet)."""
        def both() -> list[psutil.Process] | None:
            tree = psutil.Process(agentd.pid).children(recursive=True)
            return tree if len(tree) >= 2 else None

        return wait_until(both, "agentd's spawner and its standby runner")

    def test_stopped_or_killed_agentd_leaves_no_standby(self, agentd: Agentd, users: tuple[User, User]) -> None:
        for end in (agentd.stop, agentd.kill9):
            agentd.start()
            tree = self._tree(agentd)
            assert all(p.uids().real == 0 for p in tree)  # the standby is nobody's runner yet
            end()
            wait_until(lambda procs=tree: all(_gone(p) for p in procs),
                       "the spawner and its standby to go with agentd", timeout=30)


class TestOneAgentdPerSocket:
    """A socket some agentd serves is never taken from it; one an agentd left when it died is."""

    def test_a_second_agentd_on_a_served_socket_is_refused_and_the_first_serves_on(self, agentd: Agentd) -> None:
        agentd.start()
        other = agentd.root / "other-state"
        done = subprocess.run([AGENTD, "--socket", agentd.socket, "--state-dir", str(other)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert f"another agentd serves {agentd.socket}" in done.stderr
        assert agentd.ctl("list").returncode == 0  # still reachable: its socket was left alone

    def test_a_socket_left_by_an_agentd_that_died_is_taken_over(self, agentd: Agentd) -> None:
        agentd.start()
        agentd.kill9()  # leaves its socket file, with nobody listening
        assert os.path.exists(agentd.socket)
        agentd.start()
        assert agentd.ctl("list").returncode == 0


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
