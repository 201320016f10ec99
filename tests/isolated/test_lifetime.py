"""The supervisor goes away with its process and leaves no process, socket or file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

ROOT = str(Path(__file__).resolve().parents[2])

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from agent.context import Context
    from agent.executor import Attempt, Isolation
    from agent.supervisor import current_supervisor, get_executor

    async def state(context):
        context.set_state("pid", os.getpid())
        if sys.argv[1] == "hang":
            await asyncio.get_running_loop().create_future()
        return "ok"

    async def main():
        reported = asyncio.Event()
        ctx = Context(on_write=lambda k, v, d: reported.set())
        attempt = Attempt("run", "agent", "state", state, 1, context=ctx, isolation=Isolation.PROCESS)
        task = asyncio.ensure_future(get_executor(Isolation.PROCESS).run_attempt(attempt))
        await reported.wait()
        sup = current_supervisor()
        print(json.dumps({"zygote": sup.zygote.pid, "child": ctx.get_state("pid"),
                          "dirs": [sup.ipc_dir, sup.logs.directory]}), flush=True)
        if sys.argv[1] == "hang":
            sys.stdin.read()  # blocks until the test kills this process
        await task

    asyncio.run(main())
    """
)


def start(mode: str, log_dir: str | None = None, cwd: str | None = None) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("AGENT_LOG_DIR", None)
    if log_dir is not None:
        env["AGENT_LOG_DIR"] = log_dir
    # -P: this process does not look in its working directory; the test is about the zygote.
    proc = subprocess.Popen([sys.executable, "-P", "-c", SCRIPT, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True, cwd=cwd)
    info = json.loads(proc.stdout.readline())
    return proc, info


def all_gone(pids: list[int]) -> bool:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    return not alive


class TestInterpreterExit:
    """Normal exit and a killed supervisor both leave nothing behind."""

    def test_normal_exit_cleans_up(self):
        proc, info = start("finish")
        assert proc.wait(timeout=30) == 0
        assert all_gone([info["zygote"], info["child"]])
        assert not any(os.path.exists(d) for d in info["dirs"])

    def test_killed_supervisor_takes_zygote_children_and_files(self):
        proc, info = start("hang")
        assert psutil.pid_exists(info["child"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
        assert all_gone([info["zygote"], info["child"]])
        assert not any(os.path.exists(d) for d in info["dirs"])


class TestConfiguredLogDirectory:
    """With AGENT_LOG_DIR, attempt logs outlive the process; the ipc directory does not."""

    def test_logs_are_kept(self, tmp_path):
        proc, info = start("finish", log_dir=str(tmp_path))
        assert proc.wait(timeout=30) == 0
        ipc_dir, log_dir = info["dirs"]
        assert log_dir == str(tmp_path) and not os.path.exists(ipc_dir)
        assert (tmp_path / "run" / "state.attempt-1.log").exists()


class TestWorkingDirectory:
    """The zygote loads its modules from the installation, never from the working directory."""

    def test_module_in_cwd_does_not_shadow_the_zygote_imports(self, tmp_path):
        marker = tmp_path / "imported"
        (tmp_path / "random.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError\n")
        proc, info = start("finish", cwd=str(tmp_path))
        assert proc.wait(timeout=30) == 0
        assert not marker.exists()
