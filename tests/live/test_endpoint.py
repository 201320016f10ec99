"""The status endpoint: snapshots of this process's runs, the protocol, and its directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading

import pytest

from agent import Agent, ResourcePool, ResourceRequirements
from agent import live
from agent.errors import RunTimeoutError, StatusEndpointError
from agent.live import client, protocol
from agent.live.server import StatusServer, answer_request


async def _noop(context):
    return None


def blocking_agent(name: str, release: asyncio.Event) -> Agent:
    """first -> [wait, other]; ``wait`` holds the run until ``release`` is set."""
    agent = Agent(name, isolation="inline")

    async def first(context):
        return ["wait", "other"]

    async def wait(context):
        await release.wait()
        return None

    async def other(context):
        return None

    async def never(context):
        return None

    agent.add_state("first", first)
    agent.add_state("wait", wait)
    agent.add_state("other", other)
    agent.add_state("never", never)
    return agent


@contextlib.asynccontextmanager
async def held_run(name: str, until_state: str, status: str):
    """A run of :func:`blocking_agent` let go until ``until_state`` has ``status``; released on exit."""
    release = asyncio.Event()
    agent = blocking_agent(name, release)
    task = asyncio.ensure_future(agent.run())
    while agent.state_metadata[until_state].status.value != status:
        await asyncio.sleep(0)  # one loop turn: the run is inline, on this loop
    try:
        yield agent
    finally:
        release.set()
        await task


class TestSnapshots:
    """A registered run is described from its agent's status, on its own loop."""

    async def test_counts_while_running_and_after(self):
        async with held_run("snap", "other", "completed") as agent:
            entry = live.find(agent.run_id)
            snap = await asyncio.to_thread(live.read, [entry])
        assert snap[0]["status"] == "running"
        assert snap[0]["states"] == {"total": 4, "completed": 2, "running": 1, "waiting": 0, "failed": 0,
                                     "blocked": 0, "cancelled": 0, "pending": 1}
        assert [r["state"] for r in snap[0]["running"]] == ["wait"]
        final = entry.snapshot()
        assert final["status"] == "completed" and final["states"]["completed"] == 3
        assert final["elapsed"] == entry.snapshot()["elapsed"]  # a finished run's clock stops

    async def test_a_run_that_ends_while_its_states_wait_counts_its_whole_time(self):
        # No state finished: its clock runs to the run's end, not to its last state's.
        pool = ResourcePool(total_cpu=1, total_memory=100)
        assert pool.try_acquire("holder", ResourceRequirements(cpu_units=1, memory_mb=1))
        agent = Agent("starved", isolation="inline", resource_pool=pool)
        agent.add_state("s", _noop, resources=ResourceRequirements(cpu_units=1, memory_mb=1))
        with pytest.raises(RunTimeoutError):
            await agent.run(timeout=0.2)
        final = live.find(agent.run_id).snapshot()
        assert final["status"] == "failed" and final["elapsed"] >= 0.2
        pool.release("holder")

    async def test_a_run_still_going_outlives_many_finished_ones(self):
        async with held_run("long", "other", "completed") as long_run:
            finished = []
            for i in range(5 * live.KEEP_FINISHED):
                agent = Agent(f"short{i}", isolation="inline")
                agent.add_state("only", _noop)
                await agent.run()
                finished.append(agent)  # alive: only their number bounds what is kept
            ids = [r.run_id for r in live.runs()]
            assert long_run.run_id in ids  # the oldest, still running
            kept = [a.run_id for a in finished if a.run_id in ids]
            assert kept == [a.run_id for a in finished[-live.KEEP_FINISHED:]]  # the newest, in order
            assert ids[0] == long_run.run_id and ids[-1] == finished[-1].run_id  # in start order
            assert live.find(finished[-1].run_id).agent is finished[-1]
            assert live.find(finished[0].run_id) is None  # forgotten

    async def test_a_run_is_read_on_its_loop_while_it_waits_there(self):
        async with held_run("waits", "other", "completed") as agent:
            entry = live.find(agent.run_id)
            assert entry.loop is asyncio.get_running_loop()
        assert entry.loop is None  # over: read from any thread
        quick = Agent("quick", isolation="inline")
        quick.add_state("only", _noop)
        await quick.run()  # its states never awaited: it never needed its loop
        assert live.find(quick.run_id).loop is None
        assert live.find(quick.run_id).snapshot()["status"] == "completed"

    async def test_a_run_resumed_is_listed_once(self):
        agent = Agent("resumed", isolation="inline")
        agent.add_state("only", _noop)
        await agent.run()
        live.register(agent)  # as a resume of the same run registers it again
        assert [r.run_id for r in live.runs()].count(agent.run_id) == 1
        live.finished(agent)
        assert [r.run_id for r in live.runs()].count(agent.run_id) == 1

    def test_a_stuck_loop_is_still_read(self):
        entered, unblock = threading.Event(), threading.Event()
        agent = Agent("stuck", isolation="inline")

        async def hog(context):
            entered.set()
            unblock.wait(60)  # blocks the event loop itself
            return None

        agent.add_state("hog", hog)
        runner = threading.Thread(target=lambda: asyncio.run(agent.run()))
        runner.start()
        try:
            assert entered.wait(60)
            [snap] = live.read([live.find(agent.run_id)])
        finally:
            unblock.set()
            runner.join(60)
        assert snap["status"] == "running" and snap["running"][0]["state"] == "hog"


class TestProtocol:
    """Requests and answers, versioned, errors typed by code."""

    async def test_requests(self):
        async with held_run("proto", "wait", "running") as agent:
            hello = answer_request({"v": 1, "op": "hello"})
            runs = await asyncio.to_thread(answer_request, {"v": 1, "op": "runs"})
            one = await asyncio.to_thread(answer_request, {"op": "run", "run_id": agent.run_id})
        assert hello["ok"] and hello["server"] == "process" and hello["pid"] == os.getpid()
        assert set(hello["ops"]) == {"hello", "runs", "run"}
        assert agent.run_id in {r["run_id"] for r in runs["runs"]}
        assert one["run"]["agent"] == "proto"

    @pytest.mark.parametrize("request_,code", [
        ({"v": 2, "op": "runs"}, "unsupported_version"),
        ({"v": "1", "op": "runs"}, "unsupported_version"),
        ({"v": 1, "op": "submit"}, "unknown_op"),
        ({"v": 1, "op": "run", "run_id": "no-such-run"}, "not_found"),
        ({"v": 1, "op": "run"}, "not_found"),
    ])
    def test_errors(self, request_, code):
        answer = answer_request(request_)
        assert answer == {"v": 1, "ok": False, "error": {"code": code, "message": answer["error"]["message"]}}

    def test_over_a_socket(self, tmp_path):
        server = StatusServer(str(tmp_path / "run"))
        server.start()
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(server.path)
                reader = sock.makefile("rb")
                sock.sendall(b"[1, 2]\n")
                assert json.loads(reader.readline())["error"]["code"] == "bad_request"
                sock.sendall(b'{"v": 1, "op": "hello"}\n')  # the connection still serves
                assert json.loads(reader.readline())["pid"] == os.getpid()
                sock.sendall(b"x" * (protocol.MAX_LINE + 10))
                assert json.loads(reader.readline())["error"]["code"] == "too_large"
            assert oct(os.stat(server.path).st_mode & 0o777) == "0o600"
        finally:
            server.close()
        assert not os.path.exists(server.path)


    @pytest.mark.parametrize("size", [protocol.MAX_LINE + 1, protocol.MAX_LINE + 60_000])
    def test_a_line_over_the_limit_is_refused_also_when_its_newline_comes_in_one_read(self, tmp_path, size):
        server = StatusServer(str(tmp_path / "run"))
        server.start()
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(server.path)
                pad = b"x" * (size - len(b'{"v": 1, "op": "hello", "pad": ""}'))
                sock.sendall(b'{"v": 1, "op": "hello", "pad": "' + pad + b'"}\n')
                assert json.loads(sock.makefile("rb").readline())["error"]["code"] == "too_large"
        finally:
            server.close()

    def test_a_client_that_keeps_its_connection_does_not_lock_others_out(self, tmp_path):
        server = StatusServer(str(tmp_path / "run"))
        server.start()
        try:
            with socket.socket(socket.AF_UNIX) as first, socket.socket(socket.AF_UNIX) as second:
                first.connect(server.path)
                first_reader = first.makefile("rb")
                first.sendall(b'{"v": 1, "op": "runs"}\n')
                assert json.loads(first_reader.readline())["ok"] is True  # served, and kept open
                second.settimeout(3.0)  # the old endpoint never answered it while the first stayed
                second.connect(server.path)
                second.sendall(b'{"v": 1, "op": "hello"}\n')
                assert json.loads(second.makefile("rb").readline())["pid"] == os.getpid()
                first.sendall(b'{"v": 1, "op": "hello"}\n')  # the first is still served too
                assert json.loads(first_reader.readline())["pid"] == os.getpid()
        finally:
            server.close()


class TestDirectory:
    """The sockets' directory is private, and stale sockets are cleared."""

    def test_refuses_a_directory_others_may_enter(self, tmp_path):
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        shared.chmod(0o755)
        with pytest.raises(StatusEndpointError, match="not a private directory"):
            protocol.ensure_private(str(shared))

    def test_stale_socket_is_removed(self, tmp_path):
        directory = tmp_path / "run"
        directory.mkdir(mode=0o700)
        stale = directory / "4194305.sock"  # above the kernel's largest pid: no such process
        stale.write_bytes(b"")
        (directory / "notes.txt").write_text("not a socket of ours")
        assert client.endpoints(str(directory)) == []
        assert not stale.exists() and (directory / "notes.txt").exists()

    def test_a_new_endpoint_clears_the_sockets_of_killed_processes(self, tmp_path):
        directory = tmp_path / "run"
        directory.mkdir(mode=0o700)
        stale = directory / "4194305.sock"  # a process killed before it could remove its socket
        stale.write_bytes(b"")
        server = StatusServer(str(directory))
        try:
            assert not stale.exists() and os.path.exists(server.path)
        finally:
            server.close()

    def test_default_directory(self, monkeypatch, tmp_path):
        monkeypatch.delenv("AGENT_RUNTIME_DIR")
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        assert protocol.runtime_dir() == str(tmp_path / "agent")
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent")
        assert protocol.runtime_dir() in (f"/run/user/{os.getuid()}/agent", f"/tmp/agent-{os.getuid()}")


class TestForkedProcess:
    """A process forked after runs (multiprocessing's workers) reports its own, on its own endpoint."""

    async def test_the_child_starts_clean_and_serves_its_own(self):
        release = asyncio.Event()
        release.set()
        await blocking_agent("parents", release).run()
        parent_server = live.server.current()
        assert any(r.run_id for r in live.runs())
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it sees, then leave without running pytest's exit
            try:
                seen = {"inherited_runs": len(live.runs()), "inherited_server": live.server.current() is not None}
                agent = Agent("childs", isolation="inline")

                async def only(context):
                    return None

                agent.add_state("only", only)
                asyncio.run(agent.run())
                server = live.server.current()
                seen.update(runs=[r.agent.name for r in live.runs() if r.agent is not None],
                            server_pid=server.pid if server else None, pid=os.getpid())
                os.write(write_end, json.dumps(seen).encode())
                if server is not None:
                    server.close()
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as fh:
            seen = json.load(fh)
        assert seen == {"inherited_runs": 0, "inherited_server": False, "runs": ["childs"],
                        "server_pid": seen["pid"], "pid": pid}
        assert live.server.current() is parent_server and os.path.exists(parent_server.path)
