"""Escapes tried from inside real sandboxed states, run by an Agent as a user runs them.

Each test fails if the escape works. Run as root (sandboxes need it), on cgroup v1 here
and on v2 in the guest (``.ci/guest-tests``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from agent import Agent, ResourceRequirements
from agent.errors import StateFailedError
from agent.runtime import seccomp
from agent.supervisor import current_supervisor, shutdown_supervisor
from agent.supervisor.sandbox import FILE_MB_ENV, TMP_MB_ENV, UIDS_ENV

from . import escapes

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root"),
    pytest.mark.skipif(not seccomp.supported(), reason="no seccomp table for this architecture"),
]

# A uid of its own, outside the default range that other supervisors on this machine lease.
TENANT_UID = 231000 + os.getpid() % 1000
SHARED_PLACES = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def uid_leftovers(uid: int) -> dict[str, list[Any]]:
    """Everything of ``uid`` on the machine: processes, System V IPC objects, shared files."""
    processes = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and uid in p.info["uids"]]
    ipc = []
    for kind, (uid_col, cuid_col) in (("shm", (7, 9)), ("sem", (4, 6)), ("msg", (7, 9))):
        with open(f"/proc/sysvipc/{kind}") as fh:
            for row in (line.split() for line in fh.readlines()[1:]):
                if uid in (int(row[uid_col]), int(row[cuid_col])):
                    ipc.append(f"{kind} {row[1]}")
    files = []
    for folder in SHARED_PLACES:
        for entry in os.scandir(folder):
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    files.append(entry.path)
            except FileNotFoundError:  # another process's file, removed meanwhile
                continue
    return {"processes": processes, "ipc": ipc, "files": files}


NOTHING = {"processes": [], "ipc": [], "files": []}


@pytest.fixture
def single_uid(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A fresh supervisor whose sandboxes all lease the one uid TENANT_UID."""
    shutdown_supervisor()
    monkeypatch.setenv(UIDS_ENV, f"{TENANT_UID}-{TENANT_UID}")
    yield TENANT_UID
    shutdown_supervisor()


async def run_one(name: str, func: Any, keys: list[str], context: dict[str, Any] | None = None) -> Any:
    agent = Agent(name, isolation="sandbox")
    agent.add_state(name, func, context_keys=keys)
    return await agent.run(initial_context=context or {})


class TestTwoTenants:
    """Two states one after the other on the same uid: the second finds nothing of the first."""

    async def test_nothing_of_the_first_tenant_is_left(self, single_uid: int) -> None:
        left = (await run_one("tenant_a", escapes.leave_traces, ["out"])).get_state("out")
        assert left["uid"] == single_uid
        # It could make all of these, inside namespaces of its own...
        for made in ("shm", "sem", "msg", "mqueue", "abstract socket", "daemon",
                     "file /tmp", "file /var/tmp", "file /dev/shm"):
            assert left[made] == "ok", (made, left)
        # ... but never where the machine or the next tenant would see it.
        assert left["file /run/lock"] == "EROFS"
        assert left["file /dev/mqueue"] != "ok"
        assert uid_leftovers(single_uid) == NOTHING
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mq_open(escapes.MQ_NAME, os.O_RDONLY, 0, None) == -1
        assert ctypes.get_errno() == errno.ENOENT
        assert libc.shmget(escapes.SHM_KEY, 0, 0) == -1

        found = (await run_one("tenant_b", escapes.look_for_traces, ["out"])).get_state("out")
        assert found.pop("abstract socket") in ("ENOENT", "ECONNREFUSED")
        assert found == {
            "uid": single_uid, "shm": "ENOENT", "sem": "ENOENT", "msg": "ENOENT", "mqueue": "ENOENT",
            "file /tmp": False, "file /var/tmp": False, "file /dev/shm": False, "file /run/lock": False,
            "file /dev/mqueue": False, "processes": [1],
        }

    @pytest.mark.timeout(600)  # a second interpreter starts: minutes in the emulated v2 guest
    async def test_a_supervisor_killed_mid_state_leaves_nothing(self, single_uid: int, tmp_path: Any) -> None:
        """kill -9 of the supervisor: its lease file stays behind, and the next lease sweeps the uid."""
        script = tmp_path / "crash.py"
        script.write_text(textwrap.dedent(f"""
            import asyncio, sys
            sys.path.insert(0, {os.getcwd()!r})
            from agent import Agent
            from tests.sandbox import escapes

            agent = Agent("crashing", isolation="sandbox")
            agent.add_state("wait", escapes.wait_for_file, context_keys=["path"])
            asyncio.run(agent.run(initial_context={{"path": "/nonexistent/never"}}))
        """))
        proc = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ), stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 500
            while time.monotonic() < deadline:  # until the state runs as the uid
                if uid_leftovers(single_uid)["processes"] or proc.poll() is not None:
                    break
                time.sleep(0.02)
            assert uid_leftovers(single_uid)["processes"], proc.stderr.read().decode() if proc.poll() else ""
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 60
        while uid_leftovers(single_uid)["processes"] and time.monotonic() < deadline:
            time.sleep(0.02)  # the zygote and the state die of their parent-death signals
        assert uid_leftovers(single_uid) == NOTHING
        assert os.path.exists(f"/run/agent-sandbox/{single_uid}.lock")  # the crash's mark

        found = (await run_one("tenant_b", escapes.look_for_traces, ["out"])).get_state("out")
        assert found["processes"] == [1] and found["shm"] == "ENOENT"
        assert current_supervisor().confiner._uid_pool.statistics().swept_after_crash == 1  # type: ignore[union-attr]
        shutdown_supervisor()
        assert not os.path.exists(f"/run/agent-sandbox/{single_uid}.lock")


class TestSystemCalls:
    """The seccomp filter: namespaces, mounts, keyrings, ptrace, bpf, io_uring... fail with EPERM."""

    async def test_every_denied_call_fails_with_eperm(self) -> None:
        got = (await run_one("calls", escapes.try_denied_calls, ["out"])).get_state("out")
        assert got.pop("clone3") == "ENOSYS"  # the C library then falls back to clone
        assert got.pop("socket(AF_VSOCK)") == "EAFNOSUPPORT"  # no namespace confines it: as if absent
        assert got.pop("socket(AF_INET)") == "ok"  # in its own network namespace
        unshare_rm = got.pop("unshare -rm")
        assert got.pop("fork") == "0"
        assert got == dict.fromkeys(got, "EPERM"), {k: v for k, v in got.items() if v != "EPERM"}
        assert unshare_rm.startswith("1 ") and "Operation not permitted" in unshare_rm

    async def test_a_state_that_dies_of_a_denied_call_says_so(self) -> None:
        with pytest.raises(StateFailedError) as caught:
            await run_one("unsharing", escapes.die_of_unshare, [])
        reason = caught.value.reason
        assert reason.kind == "seccomp"
        assert reason.details["calls"] == ["unshare"]
        assert "seccomp" in reason.message and "unshare" in reason.message
        assert "PermissionError" in reason.message or "Operation not permitted" in reason.message


class TestProcesses:
    """PID namespace and session: it sees and can signal only its own processes."""

    async def test_sees_only_itself_and_cannot_signal_the_zygote_or_supervisor(self) -> None:
        await run_one("warm", escapes.allocate, ["mb"], {"mb": 0})  # the supervisor and zygote are up
        sup = current_supervisor()
        assert sup is not None
        zygote = sup.zygote.pid
        context = {"supervisor": os.getpid(), "zygote": zygote}
        got = (await run_one("procs", escapes.look_at_processes, ["supervisor", "zygote", "out"],
                             context)).get_state("out")
        assert got["pid"] == got["sid"] == got["pgid"] == 1  # PID 1, its own session and group
        assert got["proc"] == [1]
        assert len(got["cmdlines"]) == 1  # its own
        assert got["kill supervisor"] in ("ESRCH", "EPERM") and got["kill zygote"] in ("ESRCH", "EPERM")
        assert got["read supervisor"] == got["read zygote"] == "ENOENT"
        assert got["tty"] == "ENXIO" or got["tty"] == "ENOENT"
        assert sup.zygote.alive and psutil.pid_exists(zygote) and sup.zygote.pid == zygote

    async def test_an_abort_as_pid_1_says_it_aborted_and_where(self) -> None:
        """The kernel ignores a signal PID 1 of a namespace sends itself without a handler, so
        abort() ends it by SIGSEGV, its last resort: the failure still says it aborted."""
        with pytest.raises(StateFailedError) as caught:
            await run_one("aborting", escapes.abort, [])
        reason = caught.value.reason
        assert (reason.kind, reason.signal) == ("signal", signal.SIGSEGV)
        assert "aborted (abort()" in reason.message and "PID 1 of its sandbox" in reason.message
        assert "Fatal Python error: Aborted" in reason.traceback and "in abort" in reason.traceback
        await run_one("after", escapes.allocate, ["mb"], {"mb": 0})  # the supervisor keeps serving

    async def test_a_fork_bomb_is_stopped_by_the_pids_limit(self) -> None:
        with pytest.raises(StateFailedError) as caught:
            await run_one("bomb", escapes.fork_bomb, [])
        reason = caught.value.reason
        assert reason.kind == "limit", reason
        assert reason.details["limit"] == "pids"
        assert "pids limit 128" in reason.message

    async def test_a_fork_bomb_of_every_process_is_named_by_the_pids_limit_too(self) -> None:
        agent = Agent("bombs", isolation="sandbox")
        agent.add_state("bombs", escapes.fork_bomb_everywhere, resources=ResourceRequirements(pids_max=16))
        for _ in range(3):  # each time: the cgroup refuses first, not the sandbox's RLIMIT_NPROC backstop
            with pytest.raises(StateFailedError) as caught:
                await agent.run()
            reason = caught.value.reason
            assert reason.kind == "limit" and reason.details["limit"] == "pids", reason
            assert "pids limit 16" in reason.message


class TestLimits:
    """A sandbox declared without ResourceRequirements is limited all the same."""

    async def test_memory_without_requirements_is_capped(self) -> None:
        with pytest.raises(StateFailedError) as caught:
            await run_one("hungry", escapes.allocate, ["mb"], {"mb": 1536})
        reason = caught.value.reason
        assert reason.kind == "limit" and reason.details["limit"] == "memory", reason
        assert "memory limit 512 MiB" in reason.message


class TestFilesystem:
    """Read-only and nosuid everywhere, a private size-limited /tmp, a minimal /dev."""

    async def test_only_private_places_are_writable(self) -> None:
        got = (await run_one("mounts", escapes.look_at_mounts, ["out"])).get_state("out")
        writable = {"/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/proc"}
        for target, options in got["mounts"].items():
            assert "nosuid" in options, (target, options)
            if target not in writable:
                assert "ro" in options, (target, options)
        for target in ("/tmp", "/var/tmp", "/dev/shm"):
            assert "nodev" in got["mounts"][target]
        assert got["writes"] == {
            "/etc/agent-test": "EROFS", "/run/lock/agent-test": "EROFS", "/usr/agent-test": "EROFS",
            "/sys/fs/cgroup/agent-test": "EROFS", "/tmp/agent-test": "ok", "/var/tmp/agent-test2": "ok",
            "/dev/shm/agent-test": "ok", "/dev/agent-test": "EROFS",
        }
        assert set(got["dev"]) <= {"null", "zero", "full", "random", "urandom", "tty", "fd", "stdin", "stdout",
                                   "stderr", "shm", "mqueue"}

    async def test_writing_a_gibibyte_to_tmp_stops_at_its_size(self) -> None:
        before = os.statvfs("/tmp").f_bfree
        agent = Agent("fill", isolation="sandbox")
        agent.add_state("fill", escapes.fill_tmp, context_keys=["out"])
        got = (await agent.run()).get_state("out")
        assert got["error"] == "ENOSPC"
        assert 200 << 20 <= got["written"] <= 256 << 20
        # tmpfs pages count against the state's own memory cgroup (v1 and v2 alike).
        assert agent.state_metadata["fill"].usage["peak_memory_bytes"] >= 200 << 20
        assert os.statvfs("/tmp").f_bfree >= before - (64 << 20) // os.statvfs("/tmp").f_frsize

    async def test_a_file_over_the_size_limit_kills_the_state(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(FILE_MB_ENV, "4")
        with pytest.raises(StateFailedError) as caught:
            await run_one("big", escapes.write_big_file, ["mb"], {"mb": 8})
        reason = caught.value.reason
        assert reason.kind == "limit" and reason.details["limit"] == "file_size", reason
        assert "file size limit 4 MiB" in reason.message

    async def test_a_full_tmp_fails_the_state_naming_its_size_and_setting(self, monkeypatch: Any) -> None:
        monkeypatch.setenv(TMP_MB_ENV, "8")
        with pytest.raises(StateFailedError) as caught:
            await run_one("big", escapes.write_big_file, ["mb"], {"mb": 16})
        reason = caught.value.reason
        assert reason.kind == "limit" and reason.details == {"limit": "tmp_size", "limit_bytes": 8 << 20}, reason
        assert "No space left on device" in reason.message and "/tmp and /var/tmp hold 8 MiB" in reason.message
        assert "AGENT_SANDBOX_TMP_MB" in reason.message and "write_big_file" in reason.traceback
        assert reason.exception_type == "builtins.OSError"

    async def test_the_log_is_capped(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(FILE_MB_ENV, "2")
        agent = Agent("chatty", isolation="sandbox")
        agent.add_state("chatty", escapes.print_a_lot, context_keys=["mb"])
        with pytest.raises(StateFailedError) as caught:
            await agent.run(initial_context={"mb": 16})
        assert caught.value.reason.details["limit"] == "file_size"
        assert len(agent.logs("chatty", 1)) <= 2 << 20


class TestSecrets:
    """Keys, context and memory: a sandbox sees none of what it is not given."""

    async def test_cannot_reach_the_supervisors_keys(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        keyctl = seccomp.ARCHES[seccomp.machine()][1]["keyctl"]
        add_key = seccomp.ARCHES[seccomp.machine()][1]["add_key"]
        description = f"agent-test-{os.getpid()}"
        shutdown_supervisor()  # the next zygote shares this process's session keyring
        assert libc.syscall(ctypes.c_long(keyctl), 1, b"agent-test-session") > 0  # KEYCTL_JOIN_SESSION_KEYRING
        key = libc.syscall(ctypes.c_long(add_key), b"user", description.encode(), b"s3cr3t", 6, -3)
        assert key > 0, os.strerror(ctypes.get_errno())
        try:
            process = Agent("keys", isolation="process")  # the control: a root child finds it
            process.add_state("search", escapes.search_keyrings)
            assert (await process.run(initial_context={"key": description})).get_state("out")["search"] == "ok"
            got = (await run_one("keys", escapes.search_keyrings, ["key", "out"],
                                 {"key": description})).get_state("out")
            assert got == {"listed": False, "search": "EPERM"}
        finally:
            libc.syscall(ctypes.c_long(keyctl), 3, ctypes.c_long(key))  # KEYCTL_REVOKE
            shutdown_supervisor()

    async def test_sees_and_writes_only_its_context_keys(self) -> None:
        agent = Agent("scoped", isolation="sandbox")
        agent.add_state("read", escapes.read_scoped, context_keys=["input_*", "result", "out"])
        run = await agent.run(initial_context={"input_rows": 3, "api_key": "k-123", "approved": False})
        got = run.get_state("out")
        assert got["keys"] == ["input_rows"]
        assert got["input"] == 3
        for verb in ("read api_key", "write approved", "has api_key"):
            assert "may not" in got[verb] and "context_keys" in got[verb], got[verb]
        assert run.get_state("result") == 42 and run.get_state("approved") is False

    async def test_learns_which_states_failed_not_why(self) -> None:
        agent = Agent("told", isolation="sandbox", on_failure="continue")

        async def fan(context: Any) -> list[str]:
            return ["leaks_a_secret", "join"]

        agent.add_state("fan", fan, isolation="inline")
        agent.add_state("leaks_a_secret", escapes.leaks_a_secret, isolation="inline", next_states=["join"])
        agent.add_state("join", escapes.reads_failures, context_keys=["seen"])
        with pytest.raises(StateFailedError):
            await agent.run()
        assert list(agent.context.get_state("seen")) == ["leaks_a_secret"]
        assert "sk-live" not in str(agent.context.get_state("seen"))

    async def test_its_output_reaches_the_terminal_with_control_characters_written_out(self) -> None:
        from agent.supervisor import output

        echoed: list[tuple[str, str]] = []
        output.set_writer(lambda label, lines: echoed.extend((label, line) for line in lines))
        try:
            agent = Agent("printer", isolation="sandbox")
            agent.add_state("prints", escapes.prints_escapes)
            await agent.run()
        finally:
            output.set_writer(output.default_writer())
        assert echoed == [("prints", "\\x1b[2K\\rother_state | APPROVED\\x1b]0;owned\\x07")]
        assert agent.logs("prints").startswith("\x1b[2K")  # the log keeps what it printed

    async def test_without_context_keys_a_sandbox_sees_nothing(self) -> None:
        agent = Agent("blind", isolation="sandbox")
        agent.add_state("read", escapes.read_scoped)
        with pytest.raises(StateFailedError) as caught:
            await agent.run(initial_context={"input_rows": 3, "api_key": "k-123"})
        assert "ContextScopeError" in caught.value.reason.message
        assert "sees no context key" in caught.value.reason.message

    async def test_a_write_past_the_childs_check_is_refused_by_the_supervisor(self) -> None:
        agent = Agent("bypass", isolation="sandbox")
        agent.add_state("read", escapes.read_scoped, context_keys=["input_*", "result", "out", "bypass"])
        with pytest.raises(StateFailedError) as caught:
            await agent.run(initial_context={"input_rows": 1, "approved": False, "bypass": True})
        assert caught.value.reason.kind == "protocol"
        assert "outside its context_keys" in caught.value.reason.message
        assert agent.context.get_state("approved") is False

    async def test_the_supervisors_environment_is_not_in_its_memory(self, monkeypatch: pytest.MonkeyPatch) -> None:
        secret = f"sv-secret-{os.getpid()}-{time.monotonic_ns()}"
        shutdown_supervisor()  # a zygote started with the secret in its environment
        monkeypatch.setenv("AGENT_TEST_SUPERVISOR_SECRET", secret)
        try:
            process = Agent("env", isolation="process")
            process.add_state("scan", escapes.scan_own_memory)
            halves = [secret[:12].encode().hex(), secret[12:].encode().hex()]
            control = (await process.run(initial_context={"halves_hex": halves})).get_state("out")
            assert control["environ"] and control["hits"]
            got = (await run_one("scan", escapes.scan_own_memory, ["halves_hex", "out"],
                                 {"halves_hex": halves})).get_state("out")
            assert got == {"hits": [], "environ": False}
        finally:
            shutdown_supervisor()

    async def test_the_zygote_holds_no_childs_secret(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import secrets

        issued: list[bytes] = []
        real = secrets.token_bytes

        def recording(n: int) -> bytes:
            token = real(n)
            if n == 16:  # a child's channel secret (other callers of secrets ask other sizes)
                issued.append(token)
            return token

        monkeypatch.setattr(secrets, "token_bytes", recording)
        for isolation in ("process", "sandbox", "process", "sandbox"):
            agent = Agent("secrets", isolation=isolation)
            agent.add_state("noop", escapes.allocate, context_keys=["mb"])
            await agent.run(initial_context={"mb": 0})
        sup = current_supervisor()
        assert sup is not None and len(issued) >= 4
        memory = _read_private_memory(sup.zygote.pid)
        assert memory, "the zygote's memory could not be read"
        assert [s.hex() for s in issued if s in memory] == []


def _read_private_memory(pid: int) -> bytes:
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("rw") or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(chunks)


def mount_namespaces_held(pid: int) -> int:
    """How many mount namespaces process ``pid`` holds open as descriptors."""
    held = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            held += os.readlink(f"/proc/{pid}/fd/{name}").startswith("mnt:")
        except OSError:
            pass
    return held


class TestMountNamespace:
    """The zygote holds a sandbox's mounts while it runs (so that unmounting them is not part
    of the exit the supervisor waits for), and lets them go once it reported the exit."""

    async def test_held_while_the_state_runs_and_released_after(self) -> None:
        import asyncio

        agent = Agent("mounts", isolation="sandbox")
        agent.add_state("wait", escapes.wait_for_file, context_keys=["path"])
        running = asyncio.ensure_future(agent.run(initial_context={"path": "/nonexistent/never"}))
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                sup = current_supervisor()
                if sup is not None and mount_namespaces_held(sup.zygote.pid) == 1:
                    break
                await asyncio.sleep(0.01)
            zygote = current_supervisor().zygote.pid  # type: ignore[union-attr]
            assert mount_namespaces_held(zygote) == 1
        finally:
            running.cancel()
            try:
                await running
            except asyncio.CancelledError:
                pass
        deadline = time.monotonic() + 60
        while mount_namespaces_held(zygote) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # closed right after the exit report
        assert mount_namespaces_held(zygote) == 0
