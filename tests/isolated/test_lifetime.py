"""The supervisor goes away with its process and leaves no process, socket or file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

ROOT = str(Path(__file__).resolve().parents[2])

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from agent.context import Context
    from agent.executor import Attempt, Isolation
    from agent.supervisor import current_supervisor, get_executor

    async def state(context):
        if sys.argv[1] == "daemon":  # a process that is nobody's child in the tree: double-forked
            read, write = os.pipe()
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(write, str(os.getpid()).encode())
                    os.execvp("sleep", ["sleep", "600"])
                os._exit(0)
            context.set_state("daemon", int(os.read(read, 32)))
        context.set_state("pid", os.getpid())
        if sys.argv[1] in ("hang", "daemon"):
            await asyncio.get_running_loop().create_future()
        return "ok"

    async def main():
        reported = asyncio.Event()
        ctx = Context(on_write=lambda k, v, d: reported.set() if k == "pid" else None)
        attempt = Attempt("run", "agent", "state", state, 1, context=ctx, isolation=Isolation.PROCESS)
        task = asyncio.ensure_future(get_executor(Isolation.PROCESS).run_attempt(attempt))
        await reported.wait()
        sup = current_supervisor()
        print(json.dumps(facts(sup, ctx)), flush=True)
        if sys.argv[1] in ("hang", "daemon"):
            sys.stdin.read()  # blocks until the test kills this process
        await task
        if sys.argv[1] == "fork":  # as multiprocessing's workers are made, and end (os._exit)
            pid = os.fork()
            if pid == 0:
                child_ctx = Context()
                attempt = Attempt("run2", "agent", "state", state, 1, context=child_ctx, isolation=Isolation.PROCESS)
                asyncio.run(get_executor(Isolation.PROCESS).run_attempt(attempt))
                print(json.dumps(facts(current_supervisor(), child_ctx)), flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
            again = Context()
            attempt = Attempt("run3", "agent", "state", state, 1, context=again, isolation=Isolation.PROCESS)
            await get_executor(Isolation.PROCESS).run_attempt(attempt)
            print(json.dumps(facts(current_supervisor(), again)), flush=True)

    def facts(sup, ctx):
        return {"zygote": sup.zygote.pid, "child": ctx.get_state("pid"), "daemon": ctx.get_state("daemon"),
                "dirs": [sup.ipc_dir, sup.logs.directory], "cgroups": sup.confiner.backend.owned_dirs()}

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
                            stdout=subprocess.PIPE, env=env, text=True, cwd=cwd, start_new_session=True)
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

    @pytest.mark.parametrize("level", ["process", "worker"])
    def test_a_program_exiting_while_a_thread_runs_states_shuts_down_cleanly(self, level, tmp_path):
        """The main thread exits while a thread (a web server's, say) is in run_sync(): the
        supervisor shuts down on that thread's loop, the run there says why its state ended,
        and nothing is left."""
        script = textwrap.dedent(
            """
            import asyncio, os, sys, threading
            from agent import Agent

            async def step(context):
                context.set_state("pid", os.getpid())
                await asyncio.sleep(0.02)
                return "step"

            agent = Agent("service", isolation=sys.argv[1])
            agent.add_state("step", step)
            started = threading.Event()
            agent.add_observer(lambda event: started.set())
            threading.Thread(target=agent.run_sync, daemon=True).start()
            started.wait()
            while agent.context.get_state("pid") is None:
                threading.Event().wait(0.01)
            print(os.getpid(), flush=True)
            sys.exit(0)
            """
        )
        done = subprocess.run([sys.executable, "-c", script, level], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT, AGENT_ECHO="off"))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Exception ignored" not in done.stderr and "from outside" not in done.stderr, done.stderr[-3000:]
        left = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.cwd() == str(tmp_path):
                    left.append(proc)
        _, alive = psutil.wait_procs(left, timeout=10)
        assert not alive
        pid = done.stdout.split()[0]
        assert not [d for d in Path("/sys/fs/cgroup").glob(f"*/agent/{pid}-*") if d.exists()]

    @pytest.mark.parametrize("frozen", [False, True], ids=["running", "cgroup-frozen"])
    def test_killed_supervisor_takes_zygote_children_and_files(self, frozen):
        proc, info = start("hang")
        assert psutil.pid_exists(info["child"])
        if frozen:  # killed between freezing a cgroup and thawing it: a frozen process never
            # dies of SIGKILL, and the zygote would wait for it for ever
            freezers = [d for d in info["cgroups"] if os.path.exists(os.path.join(d, "freezer.state"))]
            if not freezers:
                proc.kill()
                proc.wait()
                pytest.skip("no v1 freezer hierarchy here")
            frozen_dir = next(os.path.join(d, sub) for d in freezers for sub in os.listdir(d)
                              if os.path.isdir(os.path.join(d, sub))
                              and str(info["child"]) in Path(d, sub, "cgroup.procs").read_text().split())
            Path(frozen_dir, "freezer.state").write_text("FROZEN")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
        assert all_gone([info["zygote"], info["child"]])
        assert not any(os.path.exists(d) for d in info["dirs"] + info["cgroups"])

    def test_killed_supervisor_takes_its_status_socket(self, tmp_path):
        # Its process removes it at exit; killed, it left it for the next endpoint of the
        # user to sweep, which may never start. Its own directory here: nothing else sweeps it.
        script = textwrap.dedent(
            """
            import asyncio, json, os, sys
            from agent import Agent
            from agent.live import server
            from agent.supervisor import current_supervisor

            async def hang(context):
                await asyncio.get_running_loop().create_future()

            async def main():
                agent = Agent("killed", isolation="process")
                agent.add_state("hang", hang)
                started = asyncio.Event()
                agent.add_observer(lambda event: started.set() if event.kind == "state_started" else None)
                run = asyncio.ensure_future(agent.run())
                await started.wait()
                print(json.dumps({"socket": server.current().path, "zygote": current_supervisor().zygote.pid}),
                      flush=True)
                sys.stdin.read()

            asyncio.run(main())
            """
        )
        env = dict(os.environ, PYTHONPATH=ROOT, AGENT_RUNTIME_DIR=str(tmp_path), AGENT_ECHO="off")
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=env, text=True, start_new_session=True)
        info = json.loads(proc.stdout.readline())
        assert Path(info["socket"]).is_socket() and Path(info["socket"]).parent == tmp_path
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
        assert all_gone([info["zygote"]])
        assert not Path(info["socket"]).exists()

    def test_killed_supervisor_takes_what_its_states_left_behind(self):
        # A daemon a state started is no child of the zygote: it goes with the cgroups.
        proc, info = start("daemon")
        assert psutil.pid_exists(info["daemon"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
        assert all_gone([info["zygote"], info["child"], info["daemon"]])
        assert not any(os.path.exists(d) for d in info["cgroups"])

    def test_a_whole_tree_killed_at_once_is_swept_by_the_next_supervisor(self):
        # As Ray does to a worker's children: nothing is left to clean up; the next one does.
        proc, info = start("hang")
        for pid in (proc.pid, info["zygote"]):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
        assert all_gone([info["zygote"], info["child"]])
        assert all(os.path.exists(d) for d in info["dirs"])
        proc, _ = start("finish")
        assert proc.wait(timeout=30) == 0
        proc.stdin.close()
        proc.stdout.close()
        assert not any(os.path.exists(d) for d in info["dirs"] + info["cgroups"])


class TestForkedProcess:
    """A process forked from one whose supervisor runs (multiprocessing's workers) runs its
    own, and leaves nothing behind when it ends with os._exit."""

    def test_child_has_its_own_supervisor_and_the_parent_keeps_its(self):
        proc, parent = start("fork")
        try:
            child, parent_again = (json.loads(proc.stdout.readline()) for _ in range(2))
            assert proc.wait(timeout=30) == 0
        finally:  # a child that hung (or spun) goes with its parent, in their process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()
        assert parent_again["zygote"] == parent["zygote"] != child["zygote"]
        assert set(child["dirs"]).isdisjoint(parent["dirs"]) and set(child["cgroups"]).isdisjoint(parent["cgroups"])
        assert all_gone([child["zygote"], parent["zygote"]])
        assert not any(os.path.exists(d) for d in child["dirs"] + child["cgroups"] + parent["dirs"])


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


class TestStaleDirectories:
    """The sweep removes only this user's directories of the kind whose process is gone."""

    def test_only_ours_of_a_gone_process(self, tmp_path):
        from agent.supervisor.cgroups.base import SupervisorName
        from agent.supervisor.private_dirs import sweep_stale

        me = SupervisorName.mine()
        gone = tmp_path / "agent-logs-4194305-1-abcdefgh"  # above the kernel's largest pid
        reused = tmp_path / f"agent-logs-{me.pid}-{me.start + 1}-abcdefgh"  # this pid, an earlier process
        kept = [
            tmp_path / f"agent-logs-{me.pid}-{me.start}-abcdefgh",  # this very process
            tmp_path / "agent-ipc-4194305-1-abcdefgh",  # another kind
            tmp_path / "agent-logs-abcdefgh",  # not named after a process
        ]
        for path in (gone, reused, *kept):
            path.mkdir()
        (gone / "run").mkdir()
        (gone / "run" / "s.attempt-1.log").write_text("x")
        if os.geteuid() == 0:  # another user's
            kept.append(tmp_path / "agent-logs-4194305-2-abcdefgh")
            kept[-1].mkdir()
            os.chown(kept[-1], 65534, 65534)
        assert sorted(sweep_stale("logs", str(tmp_path))) == sorted([str(gone), str(reused)])
        assert not gone.exists() and not reused.exists() and all(p.exists() for p in kept)
