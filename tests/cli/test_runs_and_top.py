"""``agent runs`` after a crash, and ``agent top`` attached to runs of other processes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CHAIN, release, stop

class TestRunsAfterACrash:
    """A run killed with SIGKILL in a store of its own is listed by a plain ``agent runs`` and resumes."""

    def test_listed_then_resumed(self, cli):
        _, effects = _crashed_chain(cli)
        store = cli.dir / "etl.sqlite3"
        listed = cli.run("runs", "--json")
        assert listed.returncode == 0, listed.stderr
        [run] = json.loads(listed.stdout)
        assert (run["agent_name"], run["status"], run["state"]) == ("nightly_etl", "running", "interrupted")
        assert run["store"] == str(store.resolve())
        table = cli.run("runs").stdout
        assert str(store.resolve()) in table
        row = next(line for line in table.splitlines() if run["run_id"] in line)
        assert "nightly_etl" in row and "interrupted" in row
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row) and " ago" in row
        top = json.loads(cli.run("top", "--json").stdout)  # says it as `agent runs` does
        [saved] = [r for r in top["saved"] if r["run_id"] == run["run_id"]]
        assert (saved["status"], saved["state"]) == ("running", "interrupted")

        by_file = json.loads(cli.run("runs", "flow.py", "--json").stdout)
        assert [r["run_id"] for r in by_file] == [run["run_id"]]

        del cli.env["HANG"]
        done = cli.run("run", "flow.py", "--resume", run["run_id"])
        assert done.returncode == 0, done.stderr
        assert effects.read_text().split() == ["extract", "transform", "transform", "load"]
        [after] = json.loads(cli.run("runs", "--json").stdout)
        assert (after["run_id"], after["state"]) == (run["run_id"], "completed")

    def test_no_runs(self, cli):
        done = cli.run("runs")
        assert done.returncode == 0
        assert done.stdout.startswith("agent runs: no saved runs")


class TestRunsExitCodes:
    """``agent runs`` exits as ``agent run`` would on the same file or store."""

    @pytest.mark.parametrize("name, text, message", [
        ("broken.py", "x = (\n", "SyntaxError"),
        ("needs.py", "import helper_that_is_missing\n", "ModuleNotFoundError"),
        ("noagent.py", "x = 1\n", "defines no Agent at module level"),
        ("exits.py", "import sys\nsys.exit(5)\n", "exited while it was loaded (sys.exit(5))"),  # was: status 5
    ])
    def test_a_file_that_cannot_be_loaded_exits_3(self, cli, name, text, message):
        cli.write(name, text)
        done = cli.run("runs", name)
        assert done.returncode == 3 and message in done.stderr and done.stdout == ""

    def test_an_unreadable_store_asked_for_exits_2(self, cli):
        cli.write("junk.sqlite3", "not a database\n")
        for extra in ([], ["--json"]):
            done = cli.run("runs", "--store", "junk.sqlite3", *extra)
            assert done.returncode == 2 and "not a usable checkpoint database" in done.stderr
            assert "no saved runs" not in done.stdout


class TestTop:
    """``agent top`` sees a run of another process while it runs, and the saved run after."""

    def test_attached_to_a_run_elsewhere(self, cli):
        proc = cli.start_talker()
        try:
            seen = cli.run("top", "--json")
            text = cli.run("top", "--once", "--width", "200")
            release(cli.dir / "go")
            proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert seen.returncode == 0, seen.stderr
        [process] = [p for p in json.loads(seen.stdout)["processes"] if p["pid"] == proc.pid]
        assert process["command"][-2:] == ["run", "talker.py"]
        [run] = process["runs"]
        assert (run["agent"], run["status"]) == ("talker", "running")
        assert run["states"]["running"] == 1 and run["running"][0]["state"] == "talk"
        assert run["running"][0]["isolation"] == "process"
        row = next(line for line in text.stdout.splitlines() if line.split()[:1] == [str(proc.pid)])
        assert "talker" in row and "running" in row and row.rstrip().endswith("talk")

        after = json.loads(cli.run("top", "--json").stdout)
        [saved] = [r for r in after["saved"] if r["run_id"] == run["run_id"]]
        assert saved["state"] == saved["status"] == "completed"  # the state the text view shows too
        assert not [p for p in after["processes"] if p["pid"] == proc.pid]  # its socket went with it


    def test_no_color_is_honoured_on_a_terminal(self, cli):
        # Its frame on a terminal was always coloured, NO_COLOR or not.
        proc = cli.start_talker()
        try:
            coloured = _on_a_terminal(cli, "top", "--once", "--width", "200")
            plain = _on_a_terminal(cli, "top", "--once", "--width", "200", NO_COLOR="1")
            release(cli.dir / "go")
            proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert "talker" in coloured and "\x1b[" in coloured
        assert "talker" in plain and "\x1b[" not in plain


def _crashed_chain(cli) -> tuple[str, Path]:
    """A run of CHAIN killed while transform waits (HANG stays set: a resume waits there
    too, on $GO), in a store of its own; its run id, and the file of its side effects."""
    cli.write("flow.py", CHAIN)
    effects = cli.dir / "effects"
    cli.env.update(STORE=str(cli.dir / "etl.sqlite3"), EFFECTS=str(effects), HANG="1", GO=str(cli.fifo("go")),
                   ISOLATION="inline", AGENT_RUNTIME_DIR=str(cli.dir / "runtime"))
    proc = subprocess.Popen([sys.executable, "flow.py"], stdout=subprocess.PIPE, text=True, cwd=cli.dir, env=cli.env)
    try:
        assert proc.stdout.readline() == "transform is waiting\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    [run] = json.loads(cli.run("runs", "--json").stdout)
    return run["run_id"], effects


def _on_a_terminal(cli, *args: str, **env: str) -> str:
    """What ``agent ARGS`` writes to its stdout when that is a terminal (a pseudo-terminal)."""
    ours, theirs = pty.openpty()
    proc = subprocess.Popen(cli.command(*args), stdout=theirs, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            cwd=cli.dir, env=dict(cli.env, **env))
    os.close(theirs)
    out = b""
    while True:
        try:
            chunk = os.read(ours, 65536)
        except OSError:  # EIO: the command exited, its terminal closed
            break
        if not chunk:
            break
        out += chunk
    os.close(ours)
    assert proc.wait(timeout=60) == 0
    return out.decode(errors="replace")


class TestResumeOfALiveRun:
    """A run still running in another process is not resumed alongside it."""

    def test_refused_while_it_runs(self, cli):
        proc = cli.start_talker()
        try:
            seen = json.loads(cli.run("top", "--json").stdout)
            [run] = next(p for p in seen["processes"] if p["pid"] == proc.pid)["runs"]
            done = cli.run("run", "talker.py", "--resume", run["run_id"])
            release(cli.dir / "go")
            proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert done.returncode == 2
        assert "is still running in another process" in done.stderr

    def test_two_resumes_started_together_run_it_once(self, cli):
        # Each asked the other processes whether the run was live before either had said
        # so, and both ran every state left.
        run_id, effects = _crashed_chain(cli)
        resumes = [cli.start("run", "flow.py", "--resume", run_id) for _ in range(2)]
        pool = concurrent.futures.ThreadPoolExecutor(2)
        try:
            concurrent.futures.wait([pool.submit(p.wait, 60) for p in resumes],
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            [refused] = [p for p in resumes if p.poll() is not None]
            [resuming] = [p for p in resumes if p is not refused]
            assert refused.returncode == 2
            # Which refusal depends on when the second looked: the run live, or its lock taken.
            said = refused.communicate(timeout=60)[1]
            assert f"run {run_id} is being resumed by another process" in said or (
                f"run {run_id!r} is still running in another process" in said), said
            release(cli.dir / "go")
            out, err = resuming.communicate(timeout=60)
        finally:
            for proc in resumes:
                stop(proc)
            pool.shutdown()
        assert resuming.returncode == 0, err
        assert effects.read_text().split() == ["extract", "transform", "transform", "load"]

    def test_a_resume_under_way_holds_the_run(self, cli):
        from agent.live.claim import RunClaim

        run_id, effects = _crashed_chain(cli)
        claim = RunClaim(run_id, cli.env["AGENT_RUNTIME_DIR"])
        assert claim.take()
        try:
            done = cli.run("run", "flow.py", "--resume", run_id)
        finally:
            claim.release()
        assert done.returncode == 2 and "is being resumed by another process" in done.stderr
        assert not os.path.exists(claim.path)  # released: nothing left behind
        del cli.env["HANG"]
        assert cli.run("run", "flow.py", "--resume", run_id).returncode == 0
        assert effects.read_text().split() == ["extract", "transform", "transform", "load"]

    async def test_resume_run_refuses_it_too(self, cli):
        import runpy

        from agent import AgentBusyError

        proc = cli.start_talker()
        try:
            [run] = [r for r in json.loads(cli.run("runs", "--json").stdout) if r["agent_name"] == "talker"]
            agent = runpy.run_path(str(cli.dir / "talker.py"))["agent"]
            with pytest.raises(AgentBusyError, match=rf"run {run['run_id']} is still running in process {proc.pid} "):
                await agent.resume_run(run["run_id"], run["store"])
            assert agent.status.value == "idle" and agent.run_id != run["run_id"]  # nothing was restored
            release(cli.dir / "go")
            out, _ = proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == 0 and out.count("talk | second") == 1  # ran once, in its own process
        await agent.resume_run(run["run_id"], run["store"])  # over now: restored, nothing left to run
        assert agent.status.value == "completed"


FAILS_FIRST = """
import os
import pty
from agent import Agent
agent = Agent("fails_first", isolation="inline", checkpoint_store=os.environ["STORE"])
async def step(context):
    if not os.environ.get("FIXED"):
        raise RuntimeError("not fixed yet")
agent.add_state("step", step)
"""


class TestResumeOfARunThatEnded:
    """A run that ended in a process still alive (a notebook, a service) is over: it resumes."""

    async def test_a_failed_run_of_a_live_process_resumes(self, cli, monkeypatch):
        import runpy

        from agent import StateFailedError

        store = str(cli.dir / "runs.sqlite3")
        monkeypatch.setenv("STORE", store)
        agent = runpy.run_path(str(cli.write("fails_first.py", FAILS_FIRST)))["agent"]
        with pytest.raises(StateFailedError):
            await agent.run()  # in this process, whose status endpoint still shows the run
        cli.env.update(STORE=store, FIXED="1")
        done = cli.run("run", "fails_first.py", "--resume", agent.run_id)
        assert done.returncode == 0, done.stderr
        assert "is still running in another process" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
class TestEndpointSecurity:
    """Only the same user (or root) is answered, even where the socket itself is reachable."""

    def test_other_uid_is_refused(self):
        import tempfile

        from agent.live.server import StatusServer
        from agent.supervisor.sandbox import UidPool

        directory = tempfile.mkdtemp(prefix="agent-status-test-")
        server = StatusServer(directory)
        server.start()
        pool = UidPool()
        try:
            lease = pool.lease("status-endpoint-test")
            os.chmod(directory, 0o755)  # loosened after the server checked it: only SO_PEERCRED is left
            os.chmod(server.path, 0o666)
            client = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
                      "s.sendall(b'{\"v\": 1, \"op\": \"runs\"}\\n')\nprint(s.makefile().readline())\n")
            done = subprocess.run([sys.executable, "-c", client, server.path], user=lease.uid, group=lease.uid,
                                  extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
                                  capture_output=True, text=True, timeout=60)
        finally:
            pool.close()
            server.close()
            os.rmdir(directory)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["ok"] is False and answer["error"]["code"] == "forbidden"
