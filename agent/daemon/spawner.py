"""agentd's zygote for job runners: forks each runner and turns it into the submitting user.

agentd starts it once (``python -P -m agent.daemon.spawner FD AGENTD_PID``), a clean
interpreter that imports the engine, the runner and the embedded supervisor, and holds
no thread, no event loop and nothing of any job: a runner is then a fork (milliseconds)
instead of a fresh interpreter (a few hundred). Requests come over a ``SOCK_SEQPACKET``
socketpair, one message each; ``spawn`` carries, as ``SCM_RIGHTS``, the runner's end of
the socketpair agentd made for that job. Reports: ``spawned``, ``spawn_failed``,
``exited`` (with the raw wait status).

The forked child, before it runs anything of the job (:func:`become`):

1. closes every descriptor but the job's socket (the spawner's control socket would let
   a job ask for runners of other uids; a standby runner keeps what its own warm-up
   opened, see :func:`_warm_up`), and starts a session of its own;
2. still root, joins the job's cgroup (every ``cgroup.procs`` agentd names; on v1
   through ``tasks``, see :func:`_join_cgroup`);
3. sets the user's supplementary groups, gid and uid (``setgroups``, ``setresgid``,
   ``setresuid``: all three ids, so root cannot be regained), then the parent-death
   signal (the kernel clears it on a credential change) and checks the spawner still
   lives;
4. sends stdout and stderr to the job's runner log, opened as the user;
5. replaces the environment with the one agentd built (nothing of root's) and changes to
   the submitter's working directory (else the job's directory).

It is dumpable again afterwards (the kernel clears that too on a uid change): its memory
holds only this module's imports and its own job, and the user may debug their runner.
The spawner dies with agentd (parent-death signal), and its runners with it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import stat
import subprocess
import sys
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import msgpack

from ..live.protocol import runtime_dir, socket_path
from .protocol import decode

if TYPE_CHECKING:
    import asyncio

_PR_SET_NAME = 15
_PR_SET_DUMPABLE = 4
_MAX_MESSAGE = 1 << 20
PRELOAD = (
    "agent.daemon.runner",
    "agent.runtime.zygote",
    "agent.runtime.session",
    "agent.agent",
    "agent.engine.run",
    "agent.checkpoint_store",
    "agent.store_index",
    "agent.live.server",
    "agent.supervisor",
    "agent.supervisor.confinement",
    "uvloop",
)
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


_SPAWNER_ENV = frozenset({"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"})
"""What of agentd's environment its spawner keeps, with the framework's own AGENT_* settings
(nothing else that could hold a secret)."""


class Spawner:
    """agentd's handle on its spawner process."""

    def __init__(self, on_report: Callable[[dict[str, Any]], None], on_lost: Callable[[], None]) -> None:
        self._on_report = on_report
        self._on_lost = on_lost
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Only what Python needs: a runner is a fork of the spawner, and its environment block
        # (readable in /proc/self/environ once it is the user's) would be agentd's otherwise.
        env = {k: v for k, v in os.environ.items() if k in _SPAWNER_ENV or k.startswith("AGENT_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "agent.daemon.spawner", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            theirs.close()
        self.pid = self.process.pid
        self._sock = ours
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: deque[tuple[bytes, int]] = deque()
        self.alive = True

    def attach(self, loop: "asyncio.AbstractEventLoop") -> None:
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._readable)

    def spawn(self, job_id: str, spec: dict[str, Any], fd: int) -> None:
        """Ask for a runner of ``job_id`` (``spec``: see :func:`become`) serving the socket ``fd``.

        Never blocks: a socketpair queues only a few messages, and the spawner blocks on
        its reports while agentd is not reading them, so requests wait here instead.
        """
        if not self.alive:
            raise ConnectionError("agentd's spawner is gone")
        self._out.append((_pack({"op": "spawn", "job": job_id, "spec": spec}), os.dup(fd)))
        self._flush()

    def _flush(self) -> None:
        while self._out:
            data, fd = self._out[0]
            try:
                socket.send_fds(self._sock, [data], [fd], socket.MSG_DONTWAIT)
            except BlockingIOError:
                if self._loop is not None:
                    self._loop.add_writer(self._sock.fileno(), self._flush)
                return
            except OSError:
                self._lose()
                return
            self._out.popleft()
            os.close(fd)
        if self._loop is not None:
            self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        try:
            data = self._sock.recv(_MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lose()
            return
        self._on_report(decode(data))

    def _lose(self) -> None:
        if self.alive:
            self.alive = False
            self._detach()
            self._on_lost()

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed() and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        while self._out:
            os.close(self._out.popleft()[1])

    def close(self, timeout: float = 10.0) -> None:
        """Stop the spawner: it SIGKILLs its runners and exits."""
        self.alive = False
        self._detach()
        self._sock.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the spawner process -------------------------------------------------------------------


def _set_parent_death_signal(sig: int) -> None:
    from ..runtime.child import set_parent_death_signal

    set_parent_death_signal(sig)


def _close_fds_except(*keep: int) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _join_cgroup(procs: str) -> None:
    """Move this process into the cgroup whose ``cgroup.procs`` file is ``procs``.

    On cgroup v1, writing 0 to the ``tasks`` file beside it moves the calling thread,
    which is the whole process here (a fork has one thread), and the kernel then skips
    the box-wide threadgroup lock that a ``cgroup.procs`` write takes: that lock waits
    for an RCU grace period, 7 to 20 ms here, which was the largest part of a runner's
    start. v2 has no ``tasks`` file: there the pid goes to ``cgroup.procs``.
    """
    directory, name = os.path.split(procs)
    fd, value = -1, "0"
    if name == "cgroup.procs":
        try:
            fd = os.open(os.path.join(directory, "tasks"), os.O_WRONLY)
        except FileNotFoundError:  # v2
            pass
    if fd < 0:
        fd, value = os.open(procs, os.O_WRONLY), str(os.getpid())
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def become(spec: dict[str, Any], fd: int, spawner_pid: int, own: tuple[int, ...] = ()) -> int:
    """Turn this forked child into job ``spec["job"]``'s runner (see the module docstring); its exit code.

    ``own``: descriptors this process opened itself after closing all it inherited (a
    standby runner's warm-up: libuv's signal pipe), kept open with the job's socket.
    """
    _close_fds_except(fd, *own)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    for procs in spec["cgroup_procs"]:
        _join_cgroup(procs)
    uid, gid = int(spec["uid"]), int(spec["gid"])
    os.setgroups([int(g) for g in spec["groups"]])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != spawner_pid:
        return 1  # the spawner (so agentd) died before the signal was armed
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(f"agent-job-{spec['job']}".encode()[:15]), 0, 0, 0)  # for ps
    os.umask(0o022)  # what a login session has; its own directories are 0700 anyway
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in spec["env"].items()})
    for directory in (spec.get("cwd"), spec["job_dir"]):
        try:
            if directory:
                os.chdir(directory)
                break
        except OSError:
            continue
    sys.argv = [str(spec.get("path") or "workflow.py")]
    from .runner import main

    return main(fd)


STANDBY_IDLE = 0.05
"""Seconds the spawner must have been idle before it forks a new standby runner."""


def _run(request: dict[str, Any], fd: int, spawner_pid: int, own: tuple[int, ...] = ()) -> NoReturn:
    """Become the runner ``request`` asks for (in a forked child); never returns."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        code = become(request["spec"], fd, spawner_pid, own)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):  # what the job printed last, into its log
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _warm_up() -> None:
    """Do, in the standby runner, the first-time work of a runner's own path (none of a job).

    A runner is a fork of the spawner: what it touches first costs page copies and the
    first-use setup of libraries (SQLite's, uvloop's), about 1.5 ms of CPU before its
    first state. The standby pays them while it waits: an event loop started and closed,
    a checkpoint store in memory opened, read and closed. What is left is libuv's own
    signal pipe (made once per process; the runner's loop uses it), no file, no thread.
    """
    import uvloop

    from ..checkpoint_store import SQLiteCheckpointStore

    store = SQLiteCheckpointStore(":memory:")
    store.list_runs()
    store.close()

    async def nothing() -> None:
        pass

    uvloop.run(nothing())


def _stand_by(sock: socket.socket, spawner_pid: int) -> NoReturn:
    """Wait (in a forked child) for the request of the next runner, then become it; never returns.

    Until then it holds no descriptor but ``sock`` (not the spawner's control socket: agentd
    must see the spawner go when it goes) and dies with the spawner.
    """
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _close_fds_except(sock.fileno())
        _set_parent_death_signal(signal.SIGKILL)
        if os.getppid() == spawner_pid:
            try:
                _warm_up()
            except Exception:  # noqa: BLE001 - only time is lost: the runner does it again
                pass
            data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 4)
            if data and len(fds) == 1:
                sock.close()
                own = tuple(int(n) for n in os.listdir("/proc/self/fd") if int(n) > 2 and int(n) != fds[0])
                _run(decode(data), fds[0], spawner_pid, own)
        code = 0  # the spawner closed its end, or is gone
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


class _Serve:
    """The spawner's loop: fork a runner per request, report every exit, kill them all on EOF.

    A request goes to the standby runner when there is one: a child forked ahead of time,
    while the spawner was idle, that waits for its request (:func:`_stand_by`), so that a
    job does not wait for the fork (5 ms here: the spawner holds the engine). Requests that
    come in a burst find none and are forked directly.

    A runner leaves through ``os._exit`` (it is a fork of this process) or is killed, so
    its status socket outlives it: the spawner removes it when it reaps the runner.
    """

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: dict[int, tuple[str, int]] = {}  # runner pid -> its status socket, its uid
        self.standby: tuple[int, socket.socket] | None = None  # its pid, the socket its request goes to
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def report(self, message: dict[str, Any]) -> None:
        try:
            self.control.send(_pack(message))
        except OSError:
            pass

    def loop(self) -> None:
        import select

        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # A signal to agentd's whole process group (Ctrl-C, `timeout`) is agentd's to handle:
        # the spawner goes when agentd closes its socket, or dies (parent-death signal).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.stand_by()
        while True:
            idle = None if self.standby is not None else STANDBY_IDLE
            readable, _, _ = select.select([self.control, self.wake_r], [], [], idle)
            if not readable:
                self.stand_by()
            if self.wake_r in readable:
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self.reap()
            if self.control in readable:
                data, fds, _, _ = socket.recv_fds(self.control, _MAX_MESSAGE, 4)
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return
                self.handle(data, fds)

    def stand_by(self) -> None:
        """Fork the standby runner (nothing when that fails: requests are then forked directly)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        me = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return
        if pid == 0:
            _stand_by(theirs, me)
        theirs.close()
        self.standby = (pid, ours)

    def _drop_standby(self) -> None:
        """Kill and reap the standby runner, if any."""
        if self.standby is not None:
            pid, sock = self.standby
            self.standby = None
            sock.close()
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (OSError, ChildProcessError):
                pass

    def handle(self, data: bytes, fds: list[int]) -> None:
        request = decode(data)
        if request["op"] != "spawn" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        fd = fds[0]
        pid = self._hand_over(data, fd)
        if pid is None:
            me = os.getpid()
            try:
                pid = os.fork()
            except OSError as exc:
                os.close(fd)
                self.report({"op": "spawn_failed", "job": request["job"], "error": str(exc)})
                return
            if pid == 0:
                _run(request, fd, me)
        os.close(fd)
        self.children[pid] = _status_socket(request["spec"], pid)
        self.report({"op": "spawned", "job": request["job"], "pid": pid})

    def _hand_over(self, data: bytes, fd: int) -> int | None:
        """Give the request to the standby runner; its pid, or None when there is none (or it is gone)."""
        if self.standby is None:
            return None
        pid, sock = self.standby
        self.standby = None
        try:
            socket.send_fds(sock, [data], [fd])
        except OSError:
            self.standby = (pid, sock)
            self._drop_standby()
            return None
        sock.close()
        return pid

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.children:  # a standby runner that died waiting (or was dropped)
                if self.standby is not None and self.standby[0] == pid:
                    self.standby[1].close()
                    self.standby = None
                continue
            _remove(self.children.pop(pid))
            self.report({"op": "exited", "pid": pid, "status": status})

    def kill_all(self) -> None:
        self._drop_standby()
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid, status_socket in list(self.children.items()):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            _remove(status_socket)
        self.children.clear()


def _status_socket(spec: dict[str, Any], pid: int) -> tuple[str, int]:
    """Where runner ``pid`` (started from ``spec``) keeps its status socket, and its uid."""
    env = {str(k): str(v) for k, v in spec["env"].items()}
    uid = int(spec["uid"])
    return socket_path(pid, runtime_dir(env, uid)), uid


def _remove(status_socket: tuple[str, int] | None) -> None:
    """Remove a runner's status socket: only a socket, and only one of the runner's uid (the
    directory is the user's to choose)."""
    if status_socket is None:
        return
    path, uid = status_socket
    try:
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and info.st_uid == uid:
            os.unlink(path)
    except OSError:
        pass  # it never made one


def main(argv: list[str]) -> int:
    import importlib

    control_fd, agentd_pid = int(argv[1]), int(argv[2])
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != agentd_pid:
        return 1
    control = socket.socket(fileno=control_fd)
    control.setblocking(True)
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # what is loaded now is shared by every runner, never copied by the collector
    serve = _Serve(control)
    try:
        serve.loop()
    finally:
        serve.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
