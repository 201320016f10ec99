"""The sandbox: leased uids and a child that really is unprivileged and offline.

Each test forks a child the way the process executor does, enters the sandbox in it,
and has it report what it can and cannot do over a pipe.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from agent.errors import IsolationUnavailableError
from agent.runtime import sandbox as child_sandbox
from agent.runtime.sandbox import enter_sandbox, isolate_network
from agent.runtime import seccomp
from agent.supervisor.sandbox import (
    DEFAULT_UIDS,
    FILE_MB_ENV,
    TMP_MB_ENV,
    UIDS_ENV,
    SandboxLease,
    UidPool,
    configured_uids,
    parse_uid_range,
    sandbox_spec,
)

from . import escapes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root")

SECRET_NAME = "AGENT_TEST_SANDBOX_SECRET"
SECRET_VALUE = "s3cr3t-value-of-the-supervisor"


def in_child(body: Callable[[], dict[str, Any]], spec: dict[str, Any] | None) -> dict[str, Any]:
    """Fork, enter the sandbox (when ``spec``), run ``body`` and return what it reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_end)
            out: dict[str, Any]
            try:
                if spec is not None:
                    enter_sandbox(spec)
                out = body()
            except BaseException as exc:  # report, do not raise into the forked pytest
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as reader:
        chunks.append(reader.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(b"".join(chunks))


def processes_of(uid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info["uids"]
        if uids is not None and uid in (uids.real, uids.effective, uids.saved):
            found.append(proc.pid)
    return found


@pytest.fixture
def pool() -> Iterator[UidPool]:
    pool = UidPool()
    yield pool
    uids = list(pool.leased().values())
    pool.close()
    assert pool.leased() == {}
    assert all(processes_of(uid) == [] for uid in uids)


@pytest.fixture
def lease(pool: UidPool) -> Iterator[Any]:
    lease = pool.lease("test-state")
    yield lease
    pool.release("test-state")
    assert pool.leased() == {}
    assert processes_of(lease.uid) == []


class TestUidPool:
    """Uids are leased one per owner, exclusively, across pools and processes."""

    def test_two_owners_never_share_a_uid(self, pool: UidPool) -> None:
        a = pool.lease("a")
        b = pool.lease("b")
        assert a.uid != b.uid
        assert a.uid in DEFAULT_UIDS and b.uid in DEFAULT_UIDS
        assert pool.leased() == {"a": a.uid, "b": b.uid}
        pool.release("a")
        pool.release("b")
        assert pool.statistics().leased == 0

    def test_pools_sharing_a_lock_dir_exclude_each_other(self) -> None:
        uids = range(DEFAULT_UIDS.stop - 2, DEFAULT_UIDS.stop)
        first, second = UidPool(uids), UidPool(uids)
        try:
            got = {first.lease("x").uid, first.lease("y").uid}
            assert got == set(uids)
            with pytest.raises(IsolationUnavailableError, match="widen the range"):
                second.lease("z")
            first.release("x")
            assert second.lease("z").uid in got
        finally:
            first.close()
            second.close()
        assert not any(os.path.exists(os.path.join(first.lock_dir, f"{u}.lock")) for u in uids)

    def test_a_lease_taken_ahead_is_taken_over_by_a_launch_short_of_uids(self) -> None:
        """A parked child's uid, leased ahead, goes to the launch that finds no other;
        the launch it was meant for then leases its own (or hears that none is left)."""
        uid = DEFAULT_UIDS.stop - 3
        pool = UidPool(range(uid, uid + 1))
        try:
            ahead = pool.lease("parked", ahead=True)
            with pytest.raises(IsolationUnavailableError, match="widen the range"):
                pool.lease("parked too", ahead=True)  # leases ahead never take each other over
            assert pool.lease("launch") == SandboxLease("launch", uid, uid)
            pool.release("parked")  # the parked child let go: the uid is not its own any more
            assert pool.leased() == {"launch": uid}
            with pytest.raises(IsolationUnavailableError, match="widen the range"):
                pool.claim(ahead, "later")
            pool.release("launch")
            assert pool.claim(ahead, "later").uid == uid
            assert pool.leased() == {"later": uid}
        finally:
            pool.close()

    def test_a_lease_taken_ahead_is_claimed_with_its_uid(self, pool: UidPool) -> None:
        ahead = pool.lease("parked", ahead=True)
        other = pool.lease("other")  # uids are left: nothing is taken over
        assert other.uid != ahead.uid
        with pytest.raises(IsolationUnavailableError, match="already holds"):
            pool.claim(ahead, "other")
        assert pool.claim(ahead, "launch") == SandboxLease("launch", ahead.uid, ahead.gid)
        assert pool.leased() == {"launch": ahead.uid, "other": other.uid}
        pool.release("launch")
        pool.release("other")

    def test_a_lease_file_exists_while_the_uid_is_leased(self, pool: UidPool) -> None:
        lease = pool.lease("t")
        path = os.path.join(pool.lock_dir, f"{lease.uid}.lock")
        with open(path) as fh:
            assert f"leased by pid {os.getpid()} for t" in fh.read()
        pool.release("t")
        assert not os.path.exists(path)

    def test_a_lease_file_left_by_a_crash_makes_the_next_lease_sweep_the_uid(self, tmp_path: Any) -> None:
        uid = 232000 + os.getpid() % 1000
        lock_dir = tmp_path / "locks"
        lock_dir.mkdir(mode=0o700)
        (lock_dir / f"{uid}.lock").write_text("leased by a supervisor that was killed\n")
        # What an escaped tenant could have left: a process, an IPC object, files.
        sleeper = subprocess.Popen(["sleep", "600"], user=uid, group=uid, extra_groups=[], start_new_session=True)
        subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL(None).shmget(0, 4096, 0o1666)"],
                       user=uid, group=uid, extra_groups=[], check=True)
        leftover = f"/tmp/agent-test-crash-{uid}"
        open(leftover, "w").close()
        os.chown(leftover, uid, uid)
        old_tmpdir = tempfile.mkdtemp(prefix=f"agent-sandbox-{uid}-")
        try:
            pool = UidPool(range(uid, uid + 1), lock_dir=str(lock_dir))
            lease = pool.lease("next")
            assert lease.uid == uid
            assert sleeper.wait(30) == -signal.SIGKILL
            assert not os.path.exists(leftover) and not os.path.exists(old_tmpdir)
            with open("/proc/sysvipc/shm") as fh:
                assert not [row for row in (line.split() for line in fh.readlines()[1:]) if int(row[7]) == uid]
            assert pool.statistics().swept_after_crash == 1
            pool.close()
            assert not (lock_dir / f"{uid}.lock").exists()
        finally:
            sleeper.kill()
            sleeper.wait()
            for path in (leftover,):
                if os.path.exists(path):
                    os.unlink(path)
            shutil.rmtree(old_tmpdir, ignore_errors=True)

    def test_an_owner_leases_once(self, pool: UidPool) -> None:
        pool.lease("o")
        with pytest.raises(IsolationUnavailableError, match="already holds"):
            pool.lease("o")

    def test_lock_dir_writable_by_others_is_refused(self, tmp_path: Any) -> None:
        loose = tmp_path / "locks"
        loose.mkdir()
        loose.chmod(0o777)
        with pytest.raises(IsolationUnavailableError, match="writable by it only"):
            UidPool(lock_dir=str(loose)).lease("o")

    def test_range_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(UIDS_ENV, "300000-300009")
        assert configured_uids() == range(300000, 300010)
        monkeypatch.delenv(UIDS_ENV)
        assert configured_uids() == DEFAULT_UIDS

    @pytest.mark.parametrize("text", ["abc", "10", "5-1", "0-10", "-3-5"])
    def test_bad_ranges_say_how_to_write_one(self, text: str) -> None:
        with pytest.raises(IsolationUnavailableError, match="lo"):
            parse_uid_range(text)

    def test_spec_is_plain_data(self) -> None:
        spec = sandbox_spec(200123, nofile=64, file_mb=16, tmp_mb=32)
        assert json.loads(json.dumps(spec)) == spec
        assert spec["uid"] == spec["gid"] == 200123
        assert spec["rlimits"] == {"nofile": 64, "nproc": 128, "core": 0, "fsize": 16 << 20}
        assert spec["tmp_mb"] == 32 and spec["seccomp"] and spec["filesystem"]

    def test_sizes_come_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(TMP_MB_ENV, "48")
        monkeypatch.setenv(FILE_MB_ENV, "3")
        spec = sandbox_spec(200123)
        assert spec["tmp_mb"] == 48 and spec["rlimits"]["fsize"] == 3 << 20
        monkeypatch.setenv(FILE_MB_ENV, "lots")
        with pytest.raises(IsolationUnavailableError, match="whole number of MiB"):
            sandbox_spec(200123)
        # More than a 64-bit limit holds in bytes: refused, not an OverflowError as the spec is sent.
        for env in (FILE_MB_ENV, TMP_MB_ENV):
            monkeypatch.setenv(FILE_MB_ENV, "3")
            monkeypatch.setenv(env, str(2**44))
            with pytest.raises(IsolationUnavailableError, match=f"{env}='{2**44}' must be a whole number of MiB "
                                                                "from 1 to 8796093022207"):
                sandbox_spec(200123)


class TestSandboxedChild:
    """A sandboxed child has its own uid, no network, no secrets and tight limits."""

    def test_identity_and_privileges(self, lease: Any) -> None:
        def body() -> dict[str, Any]:
            libc = ctypes.CDLL(None)
            return {
                "resuid": list(os.getresuid()),
                "resgid": list(os.getresgid()),
                "groups": os.getgroups(),
                "no_new_privs": libc.prctl(child_sandbox.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
                "dumpable": libc.prctl(child_sandbox.PR_GET_DUMPABLE, 0, 0, 0, 0),
                "cwd": os.getcwd(),
                "home": os.environ.get("HOME"),
                "tmpdir": os.environ.get("TMPDIR"),
                "core": list(__import__("resource").getrlimit(__import__("resource").RLIMIT_CORE)),
            }

        got = in_child(body, lease.spec())
        assert "error" not in got, got
        assert got["resuid"] == [lease.uid] * 3
        assert got["resgid"] == [lease.uid] * 3
        assert got["groups"] == []
        assert got["no_new_privs"] == 1
        assert got["dumpable"] == 0
        assert got["cwd"] == got["tmpdir"] == "/tmp"
        assert got["home"] == "/nonexistent"
        assert got["core"] == [0, 0]

    def test_no_tcp_connection_to_a_local_listener(self, lease: Any) -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]

            def body() -> dict[str, Any]:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                    return {"connected": True}
                except OSError as exc:
                    return {"connected": False, "errno": exc.errno}

            control = in_child(body, None)
            server.accept()[0].close()
            sandboxed = in_child(body, lease.spec())
        assert control == {"connected": True}
        assert sandboxed["connected"] is False
        assert sandboxed["errno"] == errno.ENETUNREACH

    def test_cannot_read_a_root_only_file(self, lease: Any) -> None:
        folder = tempfile.mkdtemp(prefix="agent-test-sandbox-", dir="/run")  # /tmp is private in the sandbox
        try:
            os.chmod(folder, 0o755)
            secret, public = os.path.join(folder, "secret"), os.path.join(folder, "public")
            for path, mode in ((secret, 0o600), (public, 0o644)):
                with open(path, "w") as f:
                    f.write("contents")
                os.chmod(path, mode)

            def body() -> dict[str, Any]:
                out: dict[str, Any] = {"public": open(public).read()}
                try:
                    out["secret"] = open(secret).read()
                except PermissionError:
                    out["secret"] = "EACCES"
                return out

            assert in_child(body, lease.spec()) == {"public": "contents", "secret": "EACCES"}
        finally:
            for name in os.listdir(folder):
                os.unlink(os.path.join(folder, name))
            os.rmdir(folder)

    def test_cannot_see_the_parents_environment(self, lease: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        parent = os.getpid()

        def body() -> dict[str, Any]:
            import posix

            spawned = subprocess.run(["/usr/bin/env"], capture_output=True, text=True, check=True).stdout
            readable = []
            for path in ("/proc/self/environ", f"/proc/{parent}/environ"):
                try:
                    with open(path, "rb") as f:
                        readable.append((path, SECRET_VALUE.encode() in f.read()))
                except PermissionError:
                    pass
            return {
                "environ": dict(os.environ),
                "posix": SECRET_NAME.encode() in posix.environ,
                "spawned": spawned,
                "readable": readable,
            }

        assert in_child(lambda: {"seen": os.environ.get(SECRET_NAME)}, None) == {"seen": SECRET_VALUE}
        got = in_child(body, lease.spec())
        assert "error" not in got, got
        assert SECRET_NAME not in got["environ"]
        assert set(got["environ"]) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR",
                                       "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"}
        assert got["environ"]["CUDA_VISIBLE_DEVICES"] == ""
        assert got["posix"] is False
        assert SECRET_VALUE not in got["spawned"]
        assert got["readable"] == []

    def test_cannot_read_the_arguments_it_was_started_with(self, lease: Any) -> None:
        # The zygote's arguments name the supervisor's pid, directories and cgroups.
        def body() -> dict[str, Any]:
            with open("/proc/self/cmdline", "rb") as f:
                cmdline = [a for a in f.read().split(b"\0") if a]
            return {"cmdline": [a.decode() for a in cmdline], "orig_argv": list(sys.orig_argv)}

        assert len(in_child(body, None)["cmdline"]) > 1  # unsandboxed: all of them
        got = in_child(body, lease.spec())
        assert "error" not in got, got
        assert got["cmdline"] == [sys.orig_argv[0]] and got["orig_argv"] == [sys.orig_argv[0]]

    def test_tmp_and_shm_are_private(self, lease: Any) -> None:
        fd, machine_file = tempfile.mkstemp(prefix="agent-test-visible-", dir="/tmp")
        os.close(fd)
        os.chmod(machine_file, 0o644)
        name = f"agent-test-written-{os.getpid()}"
        try:
            def body() -> dict[str, Any]:
                for folder in ("/tmp", "/dev/shm"):
                    with open(os.path.join(folder, name), "w") as f:
                        f.write("from the sandbox")
                tmp = os.statvfs("/tmp")
                return {
                    "sees_machine_tmp": os.path.exists(machine_file),
                    "var_tmp_is_tmp": os.path.samefile("/var/tmp", "/tmp"),
                    "shm": sorted(os.listdir("/dev/shm")),
                    "tmp_mb": tmp.f_blocks * tmp.f_frsize >> 20,
                }

            got = in_child(body, lease.spec(tmp_mb=32))
            assert got == {"sees_machine_tmp": False, "var_tmp_is_tmp": True, "shm": [name], "tmp_mb": 32}
            assert not os.path.exists(os.path.join("/tmp", name))
            assert not os.path.exists(os.path.join("/dev/shm", name))
        finally:
            os.unlink(machine_file)

    def test_a_fresh_session_keyring(self, lease: Any) -> None:
        """Without the filter (which denies keyctl outright) the supervisor's key is not found either."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        numbers = seccomp.ARCHES[seccomp.machine()][1]
        description = f"agent-test-keyring-{os.getpid()}"
        assert libc.syscall(ctypes.c_long(numbers["keyctl"]), 1, b"agent-test-keyring") > 0  # join a session
        key = libc.syscall(ctypes.c_long(numbers["add_key"]), b"user", description.encode(), b"x", 1, -3)
        assert key > 0

        def search() -> dict[str, Any]:
            found = libc.syscall(ctypes.c_long(numbers["keyctl"]), 10, -3, b"user", description.encode(), 0)
            return {"found": found > 0, "errno": ctypes.get_errno() if found < 0 else 0}

        try:
            assert in_child(search, None) == {"found": True, "errno": 0}
            spec = dict(lease.spec(), seccomp=False)
            assert in_child(search, spec) == {"found": False, "errno": errno.ENOKEY}
        finally:
            libc.syscall(ctypes.c_long(numbers["keyctl"]), 3, ctypes.c_long(key))

    def test_cannot_exceed_the_open_file_limit(self, lease: Any) -> None:
        def body() -> dict[str, Any]:
            import resource

            # The limit bounds the numbers of new descriptors: every free number below it
            # is handed out, then nothing (what the fork inherited keeps its numbers).
            free = [fd for fd in range(64) if not os.path.exists(f"/proc/self/fd/{fd}")]
            opened = []
            try:
                while True:
                    opened.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                failure = exc.errno
            for fd in opened:
                os.close(fd)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
                raised = True
            except (ValueError, PermissionError):
                raised = False
            return {"errno": failure, "all_free_below_limit": sorted(opened) == free, "raised": raised}

        got = in_child(body, lease.spec(nofile=64))
        assert got == {"errno": errno.EMFILE, "all_free_below_limit": True, "raised": False}

    def test_cannot_exceed_the_process_limit(self, lease: Any) -> None:
        def body() -> dict[str, Any]:
            hold_r, hold_w = os.pipe()
            children = []
            failure = None
            try:
                for _ in range(64):
                    pid = os.fork()
                    if pid == 0:
                        os.close(hold_w)
                        os.read(hold_r, 1)  # wait until the parent closes the pipe
                        os._exit(0)
                    children.append(pid)
            except OSError as exc:
                failure = exc.errno
            os.close(hold_w)
            for pid in children:
                os.waitpid(pid, 0)
            return {"forked": len(children), "errno": failure}

        got = in_child(body, lease.spec(nproc=8))
        assert got == {"forked": 7, "errno": errno.EAGAIN}

    def test_threads_outside_the_namespace_are_refused(self, lease: Any) -> None:
        def body() -> dict[str, Any]:
            release = threading.Event()
            started = threading.Event()

            def idle() -> None:
                started.set()
                release.wait()

            thread = threading.Thread(target=idle)
            thread.start()
            started.wait()
            try:
                enter_sandbox(lease.spec())
                return {"entered": True}
            except OSError as exc:
                return {"entered": False, "message": str(exc), "uid": os.getuid()}
            finally:
                release.set()
                thread.join()

        got = in_child(body, None)
        assert got["entered"] is False
        assert "isolate_network() before starting threads" in got["message"]
        assert got["uid"] == 0  # refused before any privilege was dropped

    def test_network_isolated_early_then_threads_are_fine(self, lease: Any) -> None:
        def body() -> dict[str, Any]:
            isolate_network()
            release = threading.Event()
            thread = threading.Thread(target=release.wait)
            thread.start()
            try:
                enter_sandbox(lease.spec())
                return {"uid": os.getuid()}
            finally:
                release.set()
                thread.join()

        assert in_child(body, None) == {"uid": lease.uid}

    def test_connected_ipc_socket_keeps_working_but_no_new_connection(self, lease: Any) -> None:
        import zmq

        # 0700 root like the supervisor's; outside /tmp (private in the sandbox) so that only
        # the permission, not the path, stands between the sandbox and a new connection.
        folder = tempfile.mkdtemp(prefix="agent-test-ipc-", dir="/run")
        path = os.path.join(folder, "router")
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{path}")
        try:
            def body() -> dict[str, Any]:
                isolate_network()  # before the context: its I/O thread must be inside too
                child_ctx = zmq.Context()
                dealer = child_ctx.socket(zmq.DEALER)
                dealer.connect(f"ipc://{path}")
                try:
                    dealer.send(b"hello")
                    assert dealer.poll(30000), "no reply to hello"
                    dealer.recv()
                    enter_sandbox(lease.spec())
                    dealer.send(f"after {os.getuid()}".encode())
                    assert dealer.poll(30000), "no reply after the uid change"
                    answer = dealer.recv().decode()
                    raw = socket.socket(socket.AF_UNIX)
                    try:
                        raw.connect(path)
                        fresh = "connected"
                    except PermissionError:
                        fresh = "EACCES"
                    finally:
                        raw.close()
                    return {"answer": answer, "fresh": fresh}
                finally:
                    dealer.close(linger=0)
                    child_ctx.term()

            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(read_end)
                    try:
                        out = body()
                    except BaseException as exc:
                        out = {"error": f"{type(exc).__name__}: {exc}"}
                    os.write(write_end, json.dumps(out).encode())
                finally:
                    os._exit(0)
            os.close(write_end)
            for expected in (b"hello", f"after {lease.uid}".encode()):
                if not router.poll(30000):
                    os.kill(pid, signal.SIGKILL)
                    with os.fdopen(read_end, "rb") as reader:
                        report = reader.read()
                    os.waitpid(pid, 0)
                    raise AssertionError(f"the child did not send {expected!r}; it reported {report!r}")
                peer, message = router.recv_multipart()
                assert message == expected
                router.send_multipart([peer, b"ok " + message])
            with os.fdopen(read_end, "rb") as reader:
                got = json.loads(reader.read())
            os.waitpid(pid, 0)
        finally:
            router.close(linger=0)
            ctx.term()
            if os.path.exists(path):
                os.unlink(path)
            os.rmdir(folder)
        assert got == {"answer": f"ok after {lease.uid}", "fresh": "EACCES"}

    def test_release_kills_what_the_state_left_running(self, pool: UidPool) -> None:
        lease = pool.lease("leaky")
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to us
        try:
            def body() -> dict[str, Any]:
                pid = os.fork()
                if pid == 0:
                    # Let the test see EOF on its report pipe, whatever its number (a session
                    # that ran many tests before holds many descriptors).
                    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                    os.setsid()
                    signal.pause()  # a detached leftover, waits forever
                    os._exit(0)
                return {"leftover": pid}

            leftover = in_child(body, lease.spec())["leftover"]
            assert leftover in processes_of(lease.uid)
            pool.release("leaky")
            _, status = os.waitpid(leftover, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        finally:
            ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)
        assert processes_of(lease.uid) == []

    def test_a_range_that_holds_an_account_is_refused(self) -> None:
        import pwd

        account = next(p for p in pwd.getpwall() if p.pw_uid > 0)  # daemon, nobody, ...
        with pytest.raises(IsolationUnavailableError, match=rf"include users .*{account.pw_name}\({account.pw_uid}\)"):
            UidPool(range(account.pw_uid, account.pw_uid + 1))

    async def test_a_chain_of_sandboxed_states_shares_one_uid(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With one uid, the next state of a chain waits for the uid the state before it frees
        as its process is reaped, rather than failing: every uid in use is a wait, not an error."""
        from agent import Agent
        from agent.supervisor import shutdown_supervisor

        uid = DEFAULT_UIDS.stop - 1
        shutdown_supervisor()  # the next one reads the range
        monkeypatch.setenv(UIDS_ENV, f"{uid}-{uid}")
        try:
            agent = Agent("one_uid", isolation="sandbox")
            agent.add_state("a", escapes.uid_then_b, context_keys=["a"])
            agent.add_state("b", escapes.uid_of_b, context_keys=["b"])
            for _ in range(3):
                context = await agent.run()
                assert (context.get_state("a"), context.get_state("b")) == (uid, uid)
        finally:
            shutdown_supervisor()

    def test_root_is_never_a_sandbox_uid(self) -> None:
        got = in_child(lambda: {"uid": os.getuid()}, sandbox_spec(0))
        assert "must not run as root" in got["error"]


class TestUidSweep:
    """Everything a sandbox uid runs is killed, also where no thread can be started."""

    @pytest.mark.parametrize("threads", [True, False], ids=["thread", "at-interpreter-exit"])
    def test_kill_uid_kills_every_process_of_the_uid(self, monkeypatch, threads):
        from agent.supervisor.uid_sweep import kill_uid

        uid = 3_999_123  # no account: nothing else runs as it
        procs = [subprocess.Popen(["sleep", "60"], user=uid, group=uid) for _ in range(2)]
        if not threads:  # as Python 3.12.0 and 3.12.1 do in atexit callbacks
            def refuse(self: threading.Thread) -> None:
                raise RuntimeError("can't create new thread at interpreter shutdown")

            monkeypatch.setattr(threading.Thread, "start", refuse)
        kill_uid(uid)
        assert [p.wait(timeout=10) for p in procs] == [-signal.SIGKILL] * 2
