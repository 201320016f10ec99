"""The zygote: a clean interpreter with the child's modules loaded, forking children.

Started once per supervisor (``python -m agent.runtime.zygote FD PARENT_PID
[PATH...]``). It holds no threads and no ZeroMQ context, so a fork is a cheap, safe
copy. Over the control socket ``FD`` it reads length-prefixed requests (``spawn``,
``taken``, ``kill``, and ``close`` before the supervisor closes it) and writes reports
(``spawned``, ``spawn_failed``, ``exited`` with the raw wait status and the CPU seconds
and page faults the kernel charged the child, ``denied`` for a sandbox's system call
refused by seccomp, ``parked`` for a child forked ahead, ``let_go`` for parked children
nobody needs). It exits, killing its children,
when the supervisor closes the socket or its process ends (a pidfd of it), and then
removes the PATHs (the supervisor's private directories and its cgroups, empty by then),
and, when the process ended without a ``close``, its status socket (``configure``'s
``status_socket``), so that even a supervisor killed outright leaves nothing behind.

The zygote never holds a child's secrets: each ``spawn`` request comes with a descriptor
(``SCM_RIGHTS``) of a memfd holding the child's spec (its channel secret, argv, paths),
which only the child reads, after the fork. A fork copies the zygote's heap into the
child, freed memory included, so a spec the zygote had read would reach every later
child. A sandboxed child is forked as PID 1 of a new PID namespace (the zygote unshares
it for that one fork, then returns to its own), gets fresh network and IPC namespaces
the zygote made ahead while idle, closes every descriptor it inherited but its own,
and hands its seccomp listener back over a datagram socket; the zygote answers each
denied call with EPERM and reports it.

A child need not wait for its fork: the zygote keeps a few children *parked*, forked
ahead while it is idle, each blocked on a socket of its own. It reports each one
(``parked``) with the other end of that socket, keeping none: the supervisor moves the
child into a cgroup of its own (:mod:`agent.supervisor.parked`) and, at a launch, hands
it its spec itself; once that child has said hello, it tells the zygote (``taken``),
which replaces it (a parked child that exits is replaced too). A launch so costs a
descriptor passed, and the replacement's fork overlaps the state rather than its start.
How many it keeps follows the launches it serves: one more than the largest burst of
recent ``spawn`` requests (so that a launch finds one whose cgroup is ready even while
the one taken by the launch before is being replaced), at most ``park_max``
(``AGENT_PARKED_MAX``, from the ``configure`` request), and none once no child was asked
for in ``park_idle`` seconds (``AGENT_PARKED_IDLE``, default ``PARK_IDLE``; counted from
the last park too, for a machine slower than that): it then asks the supervisor to let
them go (``let_go``), which closes the socket of each it has not handed out, and a
parked child whose socket closes exits. Sandboxed children are parked apart, following
the sandboxed launches: each is forked as PID 1 of a PID namespace of its own, made for
that one fork, holds a pair of the network and IPC namespaces made ahead, and keeps none
of the zygote's descriptors but the one it sends its seccomp listener over; a sandboxed
launch takes only such a child, any other launch only another. A parked child is a
fresh fork that has run nothing of any state; what it does before it parks (parent-death
signal, dropping the zygote's descriptors and signal handlers, a process group of its
own, and one warm-up round like the zygote's, on the event loop its attempt will run on,
so that the pages an attempt writes are its own already) is what every child does first.
It also connects to the supervisor's ROUTER (the ``endpoint`` of ``configure``) while it
waits, so that the handshake is over when its attempt starts; the connection says
nothing until the hello, which names the attempt.

Most of a child's cost is copy-on-write: each page of the zygote a child writes is
copied. Hence: the zygote is warmed up by serving whole attempts in-process before it
forks (:func:`warm_up`); being single-threaded, it forks through libc rather than
``os.fork``, whose after-fork work in the child (resetting locks and thread state,
which one thread leaves consistent, and every loaded module's ``os.register_at_fork``
hook) writes a few hundred pages (the one hook a child needs, reseeding :mod:`random`,
is done by hand); and it passes each child a descriptor of its spec, allocating nothing.
"""

from __future__ import annotations

import _signal
import array
import ctypes
import faulthandler
import functools
import gc
import os
import random
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .._stdio import open_standard_streams
from ..values import Bounds, pack_plain, unpack_plain
from . import child as child_module
from . import seccomp
from .child import set_parent_death_signal
from .sandbox import CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID, unshare
from .worker import EXIT_IDLE

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

_libc_fork = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: the GIL is held across it
_HEADER = struct.Struct("!I")
_SIGTERM = (int(signal.SIGTERM),)
_CONTROL_BOUNDS = Bounds(max_frame=16 * 1024 * 1024)
MAX_FDS_PER_READ = 64
# Denied calls answered per sandboxed child (then its listener is closed and further
# denied calls fail with ENOSYS), and reported to the supervisor.
MAX_ANSWERS = 256
MAX_REPORTS = 8
# Fresh network and IPC namespaces made ahead, while idle: a network namespace costs
# about 1.5 ms to make, which a sandboxed child then does not wait for.
SPARE_NAMESPACES = 2
# Parked children: at most this many by default (``configure``'s ``park_max``), and none
# after this many seconds without a spawn request.
PARK_MAX = 4
PARK_IDLE = 5.0
_POLL_MOST = 2**31 - 1  # milliseconds
_UCRED = struct.Struct("iII")


def frame(obj: Any) -> bytes:
    """``obj`` as one length-prefixed frame of the control socket."""
    data = pack_plain(obj)
    return _HEADER.pack(len(data)) + data


def write_frame(sock: socket.socket, obj: Any, fds: Sequence[int] = ()) -> None:
    """Send ``obj`` as one frame, with descriptors ``fds`` (``SCM_RIGHTS``) on its first byte."""
    data = frame(obj)
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    if sent < len(data):
        sock.sendall(data[sent:])  # a signal cut the first write short


def read_frames(buffer: bytearray) -> list[Any]:
    """Pop every complete frame from ``buffer``."""
    out = []
    while len(buffer) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer)
        if len(buffer) < _HEADER.size + size:
            break
        out.append(unpack_plain(bytes(buffer[_HEADER.size : _HEADER.size + size]), _CONTROL_BOUNDS))
        del buffer[: _HEADER.size + size]
    return out


def receive(sock: socket.socket, buffer: bytearray, fds: deque[int]) -> bool:
    """Read what is there into ``buffer`` and descriptors passed with it into ``fds``;
    False at end of stream."""
    data, received, _, _ = socket.recv_fds(sock, 1 << 16, MAX_FDS_PER_READ)
    fds.extend(received)
    if not data:
        return False
    buffer += data
    return True


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _open_ns(kind: str) -> int:
    return os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)


def _setns(fd: int, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


class _Parking:
    """The parked children of one kind (plain or sandboxed) and how many to keep."""

    def __init__(self) -> None:
        self.children: deque[int] = deque()  # pids, oldest first
        self.target = 0
        self.burst = 0  # spawns of this kind served since the zygote was last idle


class Zygote:
    """The fork loop."""

    def __init__(
        self, control: socket.socket, parent: int | None, spec_fds: deque[int] | None = None, *,
        park_max: int = PARK_MAX, park_idle: float = PARK_IDLE, endpoint: str = "",
    ) -> None:
        self._control = control
        self._parent = parent  # a pidfd of the supervisor's process (see _watch_parent)
        self.closed = False  # the supervisor said it closes: an end of its socket without it is its death
        self._children: set[int] = set()
        self._spec_fds: deque[int] = spec_fds if spec_fds is not None else deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Checked once: the zygote starts no thread, so this stays true.
        self._single_threaded = _thread_count() == 1
        # Children check this to learn whether the zygote died before they asked for
        # its death signal (getppid() says nothing to PID 1 of a namespace).
        try:
            self._pidfd: int | None = os.pidfd_open(os.getpid())
        except OSError:
            self._pidfd = None
        # Made at the first sandboxed spawn: the PID namespace to come back to, and the
        # socket sandboxed children send their seccomp listener over.
        self._pidns: int | None = None
        self._own_ns: tuple[int, int] | None = None  # network, IPC
        self._spares: deque[tuple[int, int]] = deque()
        self._notify: tuple[socket.socket, socket.socket] | None = None
        self._listeners: dict[int, list[int]] = {}  # fd -> [child pid, answered, reported]
        self._mounts: dict[int, int] = {}  # sandboxed child's pid -> its mount namespace, held until reaped
        self._idle_cgroups: dict[int, list[str]] = {}  # a worker's pid -> its cgroup's directories
        self._poll = select.poll()
        # Parked children, for plain and for sandboxed launches.
        self._parking = {False: _Parking(), True: _Parking()}
        self._park_max = max(0, park_max)
        self._park_idle = park_idle
        self._endpoint = endpoint  # the supervisor's ROUTER, which parked children connect to ahead
        self._name = child_module.process_name()
        self._last_spawn = 0.0

    def serve(self, pending: list[Any], buffer: bytearray) -> None:
        """Serve requests until the supervisor goes: ``pending`` ones first, then the socket's
        (``buffer`` holds the start of one already read)."""
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for request in pending:
            self._handle(request)
        control, wake, parent = self._control.fileno(), self._wake_r, self._parent
        for fd in (control, wake, parent):
            if fd is not None:
                self._poll.register(fd, select.POLLIN)
        while True:
            events = dict(self._poll.poll(self._poll_timeout()))
            if not events:
                self._unpark_all()  # idle for PARK_IDLE seconds: nobody is launching
                continue
            if parent in events:
                break  # the supervisor's process is gone
            if control in events:
                if not receive(self._control, buffer, self._spec_fds):
                    break
                for request in read_frames(buffer):
                    self._handle(request)
            if wake in events:
                self._drain_wakeups()
                self._reap()
            if self._notify is not None and self._notify[0].fileno() in events:
                self._adopt_listener()
            for fd, mask in events.items():
                if fd in self._listeners:
                    self._answer(fd, mask)
            while self._own_ns is not None and len(self._spares) < SPARE_NAMESPACES and not self._poll.poll(0):
                self._make_spare()
            if not self._poll.poll(0):
                for sandbox, parking in self._parking.items():
                    parking.burst = 0
                    while len(parking.children) < parking.target and not self._poll.poll(0):
                        if not self._park(sandbox):
                            break

    def _handle(self, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op == "spawn":
            self._spawn(request["id"], bool(request.get("sandbox")), int(request.get("fds", 1)))
        elif op == "taken":
            self._taken(request["pid"], bool(request.get("sandbox")))
        elif op == "kill":
            self._kill(request["pid"], request.get("signal", signal.SIGKILL))
        elif op == "close":
            self.closed = True
        elif op == "idle_cgroup":
            if request["pid"] in self._children:  # else reaped already: the supervisor removes it
                self._idle_cgroups[request["pid"]] = [str(path) for path in request["dirs"]]

    def _private_fds(self) -> list[int]:
        """Descriptors of the zygote's own that no child keeps."""
        fds = [self._control.fileno(), self._wake_r, self._wake_w, *self._listeners, *self._mounts.values(),
               *self._spec_fds]
        if self._notify is not None:
            fds += [sock.fileno() for sock in self._notify]
        for pair in (self._own_ns, *self._spares):
            fds += pair or ()
        return fds + [fd for fd in (self._pidfd, self._pidns, self._parent) if fd is not None]

    def _spawn(self, request_id: int, sandbox: bool, nfds: int = 1) -> None:
        if len(self._spec_fds) < nfds or nfds < 1:
            write_frame(self._control, {"op": "spawn_failed", "id": request_id,
                                        "error": "the spawn request came without its spec"})
            return
        spec_fd = self._spec_fds.popleft()
        extra = [self._spec_fds.popleft() for _ in range(nfds - 1)]  # handed on, never used here
        self._count_spawn(sandbox)
        pid, error = self._fork_child(
            sandbox,
            lambda notify, spare: child_module.child_main(spec_fd, self._pidfd, self._private_fds(), notify,
                                                          spare, extra),
            [spec_fd, *extra],
        )
        if pid < 0:
            write_frame(self._control, {"op": "spawn_failed", "id": request_id, "error": error})
            return
        self._children.add(pid)
        write_frame(self._control, {"op": "spawned", "id": request_id, "pid": pid})

    def _fork_child(
        self, sandbox: bool, become: Callable[[int | None, list[int]], NoReturn], handed: list[int],
        name: bytes | None = None,
    ) -> tuple[int, str]:
        """Fork a child that runs ``become(notify, namespaces)``; ``(pid, "")``, or ``(-1, why)``.

        A sandboxed child is PID 1 of a PID namespace made for this one fork, gets a pair
        of the network and IPC namespaces made ahead and the descriptor to send its seccomp
        listener over (``notify``). ``handed``: descriptors that are the child's, closed
        here after the fork (or when there is none); ``name``: the child's process name
        from its first instant.
        """
        spare: tuple[int, int] | tuple[()] = ()
        try:
            if sandbox:
                self._prepare_sandboxes()
                spare = self._spares.popleft() if self._spares else ()
                unshare(CLONE_NEWPID)  # the next child is PID 1 of a namespace of its own
        except OSError as exc:
            for fd in (*handed, *spare):
                os.close(fd)
            return -1, f"cannot make a PID namespace: {exc}"
        # SIGTERM (the zygote's own clean-up) stays blocked in the child until it resets it.
        # (``_signal``: the ``signal`` wrapper builds an enum set of the old mask per call.)
        _signal.pthread_sigmask(signal.SIG_BLOCK, _SIGTERM)
        if name is not None:
            child_module.set_process_name(name)
        error = ""
        try:
            pid = self._fork()
        except OSError as exc:
            pid, error = -1, str(exc)
        if pid == 0:
            notify = self._notify[1].fileno() if sandbox and self._notify is not None else None
            become(notify, list(spare))
        if name is not None:
            child_module.set_process_name(self._name)
        _signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGTERM)
        for fd in (*handed, *spare):
            os.close(fd)
        if sandbox:
            _setns(self._pidns, CLONE_NEWPID)  # type: ignore[arg-type]
        return pid, error

    # --- parked children -----------------------------------------------------------------

    def _count_spawn(self, sandbox: bool) -> None:
        """Follow the launch rate: park one more child of a kind than its largest recent burst."""
        now = time.monotonic()
        if now - self._last_spawn > self._park_idle:
            for parking in self._parking.values():
                parking.target = 0
        self._last_spawn = now
        parking = self._parking[sandbox]
        parking.burst += 1
        parking.target = min(self._park_max, max(parking.target, parking.burst + 1))

    def _poll_timeout(self) -> int | None:
        """Milliseconds until parked children are let go for lack of launches (None: never)."""
        if not any(parking.children for parking in self._parking.values()):
            return None
        left = self._last_spawn + self._park_idle - time.monotonic()
        # At most what poll() takes (about 24 days): a longer wait just polls again.
        return max(1, int(min(left * 1000, _POLL_MOST - 1)) + 1) if left > 0 else 0

    def _park(self, sandbox: bool) -> bool:
        """Fork a child that waits for its spec (as a sandboxed launch's: see the module
        docstring); False when it could not be forked."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        their_fd = theirs.detach()
        pid, _ = self._fork_child(
            sandbox,
            lambda notify, spare: child_module.park(
                their_fd, self._pidfd, [*self._private_fds(), ours.fileno()], _warm_once, self._endpoint,
                self._name, (notify, spare) if sandbox else None),
            [their_fd],
            child_module.PARKED_NAME,
        )
        if pid < 0:
            ours.close()
            return False
        self._children.add(pid)
        self._parking[sandbox].children.append(pid)
        # Let go for lack of launches only PARK_IDLE seconds after it was parked: where a
        # launch takes longer than that (an emulated machine), its children are still used.
        self._last_spawn = max(self._last_spawn, time.monotonic())
        # The only other end of the child's socket goes to the supervisor, which alone hands
        # the child its spec, or lets it go.
        try:
            write_frame(self._control, {"op": "parked", "pid": pid, "sandbox": sandbox}, [ours.fileno()])
        finally:
            ours.close()
        return True

    def _taken(self, pid: int, sandbox: bool) -> None:
        """The supervisor handed parked child ``pid`` a spec: one to replace."""
        children = self._parking[sandbox].children
        if pid in children:
            children.remove(pid)  # else it was in a let_go report already, which came too late
        self._count_spawn(sandbox)

    def _unpark_all(self) -> None:
        """Have the supervisor let every parked child go (each exits when its socket closes)."""
        pids = []
        for parking in self._parking.values():
            parking.target = 0
            pids += parking.children
            parking.children.clear()
        if pids:
            write_frame(self._control, {"op": "let_go", "pids": pids})

    def _fork(self) -> int:
        if not self._single_threaded:
            return os.fork()
        pid = _libc_fork()
        if pid < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        if pid == 0:  # what of os.fork's after-fork work a child needs
            random.seed()  # else every child draws the zygote's sequence
            threading.main_thread()._set_native_id()
        return pid

    def _kill(self, pid: int, sig: int) -> None:
        # Only a child not yet reaped: its pid (and process group) cannot have been reused.
        if pid not in self._children:
            return
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
        try:
            os.kill(pid, sig)
        except OSError:
            pass

    def _prepare_sandboxes(self) -> None:
        if self._pidns is None:
            self._pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._own_ns = (_open_ns("net"), _open_ns("ipc"))
            except OSError:
                pass  # no spares: each child makes its own
        if self._notify is None:
            receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._notify = (receiver, sender)
            self._poll.register(receiver.fileno(), select.POLLIN)

    def _make_spare(self) -> None:
        """New network and IPC namespaces for a future sandboxed child; the zygote stays in its own."""
        own_net, own_ipc = self._own_ns  # type: ignore[misc]
        try:
            unshare(CLONE_NEWNET | CLONE_NEWIPC)
        except OSError:
            self._own_ns = None  # cannot: children make their own
            return
        try:
            spare = (_open_ns("net"), _open_ns("ipc"))
        except OSError:
            self._own_ns = None
            spare = None
        # Back home, or die trying: a zygote in the wrong namespaces must not fork.
        _setns(own_net, CLONE_NEWNET)
        _setns(own_ipc, CLONE_NEWIPC)
        if spare is not None:
            self._spares.append(spare)

    def _adopt_listener(self) -> None:
        """Take a sandboxed child's mount namespace and seccomp listener (sent once, with the
        child's credentials; :func:`~agent.runtime.sandbox.enter_sandbox` says which came)."""
        space = socket.CMSG_SPACE(2 * array.array("i").itemsize) + socket.CMSG_SPACE(_UCRED.size)
        try:
            kinds, ancdata, _, _ = self._notify[0].recvmsg(16, space, socket.MSG_DONTWAIT)  # type: ignore[index]
        except BlockingIOError:
            return
        fds, pid = [], None
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(data[: _UCRED.size])[0]
        first = pid in self._children and pid not in self._mounts and not any(
            entry[0] == pid for entry in self._listeners.values())
        for what, fd in zip(kinds.ljust(len(fds), b"?"), fds):
            if first and what == ord("M"):
                self._mounts[pid] = fd  # type: ignore[index]
            elif first and what == ord("L"):
                self._listeners[fd] = [pid, 0, 0]  # type: ignore[list-item]
                self._poll.register(fd, select.POLLIN)
            else:
                os.close(fd)

    def _answer(self, fd: int, mask: int) -> None:
        entry = self._listeners[fd]
        if not mask & select.POLLIN:  # no task uses the filter any more
            self._drop_listener(fd)
            return
        try:
            denied = seccomp.answer(fd)
        except OSError:
            self._drop_listener(fd)
            return
        if denied is not None:
            entry[1] += 1
            if entry[2] < MAX_REPORTS:
                entry[2] += 1
                try:
                    write_frame(self._control, {"op": "denied", "pid": entry[0],
                                                "call": seccomp.syscall_name(denied[1])})
                except OSError:
                    pass
        if entry[1] >= MAX_ANSWERS:
            self._drop_listener(fd)

    def _drop_listener(self, fd: int) -> None:
        self._poll.unregister(fd)
        del self._listeners[fd]
        os.close(fd)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                # wait4: the kernel's own CPU and fault figures for the child (and what it
                # reaped), which the supervisor compares with its cgroup's to see whether it left.
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._children.discard(pid)
            for parking in self._parking.values():
                if pid in parking.children:
                    parking.children.remove(pid)  # a parked child gone before its launch
            for fd, entry in list(self._listeners.items()):
                if entry[0] == pid:
                    self._drop_listener(fd)
            dirs = self._idle_cgroups.pop(pid, None)
            if dirs is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_IDLE:
                _remove_empty(dirs)
            cpu = rusage.ru_utime + rusage.ru_stime
            faults = rusage.ru_minflt + rusage.ru_majflt
            try:
                write_frame(self._control, {"op": "exited", "pid": pid, "status": status, "cpu": cpu,
                                            "faults": faults})
            except OSError:
                pass
            mounts = self._mounts.pop(pid, None)
            if mounts is not None:
                os.close(mounts)  # the sandbox's file systems go now, after the report

    def _kill_all(self, cgroups: Sequence[str] = ()) -> None:
        """Kill every child and reap it. ``cgroups``: the supervisor's cgroup directories, whose
        frozen cgroups are thawed first (a supervisor killed between freezing a cgroup and
        thawing it leaves its processes frozen, and a frozen process never dies of SIGKILL)."""
        for pid in list(self._children):
            self._kill(pid, signal.SIGKILL)
        for path in cgroups:
            _thaw_below(path)
        for pid in list(self._children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._children.clear()


def _remove_empty(dirs: list[str]) -> None:
    """Remove a worker's cgroup once it idled out, so that it goes with its worker even while
    no event loop serves the supervisor (after ``run_sync()`` returned). One left busy (a
    process or cgroup of its state's in it) is the supervisor's to remove, as it always is."""
    for path in dirs:
        try:
            os.rmdir(path)
        except OSError:
            pass


def _thaw_below(path: str) -> None:
    """Thaw every v1 freezer cgroup at and below ``path`` (nothing unless it is one)."""
    if not os.path.exists(os.path.join(path, "freezer.state")):
        return
    for directory, _, files in os.walk(path):
        if "freezer.state" in files:
            try:
                with open(os.path.join(directory, "freezer.state"), "w") as state:
                    state.write("THAWED")
            except OSError:
                pass


def _kill_left_in(paths: Sequence[str], rounds: int = 20) -> None:
    """SIGKILL every process still in the cgroups at and below ``paths`` (the supervisor's
    own): what a state started and left behind is no child of the zygote (a daemon that
    double-forked), and must not outlive the supervisor. Again until none is left (one may
    have forked meanwhile), at most ``rounds`` times."""
    me = os.getpid()
    for _ in range(rounds):
        left = False
        for path in paths:
            if not os.path.exists(os.path.join(path, "cgroup.procs")):
                continue
            for directory, _, files in os.walk(path):
                if "cgroup.procs" not in files:
                    continue
                try:
                    with open(os.path.join(directory, "cgroup.procs")) as procs:
                        pids = [int(p) for p in procs.read().split()]
                except (OSError, ValueError):
                    continue
                for pid in pids:
                    if pid != me:
                        left = True
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
        if not left:
            return
        time.sleep(0.01)  # they leave their cgroups as they exit


def _read_configure(
    control: socket.socket, buffer: bytearray, fds: deque[int]
) -> tuple[dict[str, Any], list[Any]]:
    """Block for the supervisor's first request, ``configure``; return it and any read with it."""
    while not (requests := read_frames(buffer)):
        if not receive(control, buffer, fds):
            raise _ParentDied()
    config, *pending = requests
    if not isinstance(config, dict) or config.get("op") != "configure":
        raise RuntimeError(f"the zygote's first request must be 'configure', not {config!r}")
    return config, pending


def preload(modules: Sequence[str], import_path: Sequence[str]) -> None:
    """Import ``modules`` (``AGENT_PRELOAD``) once, here, so that every child inherits them.

    A state whose function or context needs a module the zygote has not loaded imports it
    in its own process, every time: for numpy, pandas or torch that is far more than the
    fork. Like :func:`multiprocessing.set_forkserver_preload`, the list is explicit:
    importing runs the module's code in the zygote. A module that cannot be imported is
    reported on stderr and skipped (children then import it themselves); one that starts
    threads is reported too, since the zygote then forks a multi-threaded process.
    """
    import importlib

    saved = sys.path[:]
    sys.path[:] = [*import_path, *saved]
    try:
        for name in modules:
            before = _thread_count()
            try:
                importlib.import_module(name)
            except BaseException as exc:  # its top-level code may raise anything, even SystemExit
                print(f"agent: AGENT_PRELOAD: cannot import {name!r} ({type(exc).__name__}: {exc}); "
                      "each state's process will import it itself", file=sys.stderr, flush=True)
                continue
            started = _thread_count() - before
            if started > 0:
                print(f"agent: AGENT_PRELOAD: importing {name!r} started {started} thread(s) in "
                      "the zygote; children are forked from a multi-threaded process, which is only "
                      "as safe as that module's fork handlers", file=sys.stderr, flush=True)
    finally:
        sys.path[:] = saved


async def _warm_state(context: Any) -> dict[str, Any]:
    context.set_state("count", context.get_state("count", 0) + 1)
    return {"ok": [1, 2.0, "x", None]}


def warm_up(rounds: int = 12, loop: AbstractEventLoop | None = None) -> None:
    """Serve whole attempts in-process, as every child will, before the first fork.

    Lazy initialisation then happens once, here; and CPython specialises a function's
    bytecode in place after a few calls, so children share code that is already
    specialised instead of each rewriting (and so copying) it. A round is a
    :class:`ChildSession` on a :class:`DealerTransport` whose peer, one end of a
    socketpair, was loaded beforehand with what the supervisor's ROUTER would send. It
    leaves nothing behind: no thread, no socket, no event loop (each round makes its own,
    unless given ``loop``, which it runs and keeps open: a parked child's own).
    """
    import asyncio

    import uvloop

    from ..ipc import DealerTransport
    from ..ipc.zmtp import GREETING, frame, ready_command
    from . import confine
    from .session import ChildSession

    run = _sample_run()
    for round_ in range(rounds):
        _read_sample_spec(run)
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A third of the rounds on asyncio's own loop, which sandboxed children use.
        own = loop is None
        round_loop = (asyncio.SelectorEventLoop() if round_ % 3 == 2 else uvloop.new_event_loop()) if own else loop
        asyncio.set_event_loop(round_loop)
        try:
            peer.sendall(GREETING + ready_command(b"ROUTER", b"") + frame(run))
            transport = DealerTransport.over(ours, b"", linger=0)  # the peer never closes
            session = ChildSession(transport, pid=os.getpid(), secret=b"warm-up")
            session.hello()
            round_loop.run_until_complete(child_module.serve(session, transport))
            confine.apply({})
        finally:
            if own:
                round_loop.close()
            asyncio.set_event_loop(None)
            ours.close()
            peer.close()


@functools.cache
def _sample_run() -> bytes:
    """The ``run`` message the warm-up serves, made once, in the zygote: a parked child's
    warm-up serves it too, and a child never encodes one (its supervisor does), so making
    it there again was work for nothing."""
    import cloudpickle

    from .. import values
    from ..ipc import Run, encode_message

    return encode_message(Run(
        run_id="warm-up", agent_name="zygote", state_name="warm", attempt=1,
        function=cloudpickle.dumps(_warm_state), classes=cloudpickle.dumps(()),
        context={"count": values.encode(1), "t": values.encode((1, {2}))},
        max_frame=values.DEFAULT_MAX_FRAME, context_budget=values.MIB, context_bytes=0, failures={},
    ))


def _read_sample_spec(run: bytes) -> None:
    """Write and read back a spec shaped like a launch's (paths, a secret, the run message),
    as a child does first: the memory its decoding takes is then its own already."""
    cgroup = "/sys/fs/cgroup/{}/agent/1234567-1234567-abcdef/abcdef01-state-1-1/cgroup.procs"
    sample = {
        "endpoint": "ipc:///tmp/agent-0123456789abcdef/ipc/supervisor.sock", "secret": bytes(16),
        "confine": {"cgroup_procs": [cgroup.format(c) for c in ("memory", "cpuacct", "pids", "blkio", "freezer")],
                    "gpu": {"env": {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}}},
        "sys_path": list(sys.path), "argv": list(sys.argv), "main": {"path": os.getcwd() + "/flow.py"},
        "context_keys": None, "cwd": os.getcwd(), "max_frame": 1 << 26, "receive_hwm": 1000, "run": run,
    }
    fd = child_module.spec_memfd(sample)
    try:
        child_module.read_run(fd, child_module.read_spec(fd))
    finally:
        os.close(fd)


def charged_so_far(pid: int) -> tuple[float, int]:
    """CPU seconds and page faults the kernel charged live process ``pid`` so far (0s if gone)."""
    stat = _stat_of(pid)
    return (0.0, 0) if stat is None else charged_in(stat)


def charged_with_children(pid: int) -> tuple[float, int] | None:
    """:func:`charged_so_far`, plus what its reaped children took (as ``wait4`` counts once it
    is reaped); None when ``pid`` is gone."""
    stat = _stat_of(pid)
    return None if stat is None else charged_in(stat, children=True)


def _stat_of(pid: int) -> bytes | None:
    """``/proc/<pid>/stat`` (None: no such process), read with one system call: a launch and
    each result read it, and a buffered file object costs several times that."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def charged_in(stat: bytes, *, children: bool = False) -> tuple[float, int]:
    """CPU seconds and page faults in the text of a ``/proc/<pid>/stat`` (with ``children``:
    plus those of its reaped children)."""
    fields = stat.rpartition(b")")[2].split()
    # After the command: minflt is field 10, cminflt 11, majflt 12, cmajflt 13, utime 14,
    # stime 15, cutime 16, cstime 17 (from 1, state 3).
    if children:
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        return ticks / _CLOCK_TICKS, int(fields[7]) + int(fields[8]) + int(fields[9]) + int(fields[10])
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS, int(fields[7]) + int(fields[9])


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _warm_once(loop: AbstractEventLoop) -> None:
    warm_up(1, loop)


def _release_free_heap() -> None:
    """Give free heap pages back to the kernel (glibc ``malloc_trim``).

    Every page the zygote holds is copied into each child's page tables at fork and
    walked again when the child exits: a smaller zygote forks and reaps faster.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class _ParentDied(Exception):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one interruption only: the clean-up must run
    raise _ParentDied()


def _watch_parent(parent_pid: int) -> int | None:
    """A pidfd of the supervisor's process: readable once that whole process has ended.

    Not the parent-death signal: it comes when the *thread* that started the zygote ends,
    and an agent may run on a thread that ends long before its process (its supervisor,
    shared by the process, would then lose every child of every later run). Where there
    are no pidfds (Linux before 5.3) that signal is the fallback.
    """
    try:
        return os.pidfd_open(parent_pid)
    except OSError:
        set_parent_death_signal(signal.SIGTERM)
        return None


def main(argv: list[str]) -> int:
    control_fd, parent_pid, cleanup = int(argv[1]), int(argv[2]), argv[3:]
    # Its descriptors 1 and 2 are the program's, which may have been closed or be a
    # descriptor closed on exec (an event loop's, made where 1 was free): first of all, so
    # that no descriptor of its own, and none of a child's, takes one of those numbers.
    open_standard_streams()
    signal.signal(signal.SIGTERM, _on_sigterm)
    parent = _watch_parent(parent_pid)
    zygote = None
    status_socket = ""
    try:
        if os.getppid() != parent_pid:
            return 1  # the supervisor is already gone
        control = socket.socket(fileno=control_fd)
        control.setblocking(True)
        buffer = bytearray()
        spec_fds: deque[int] = deque()
        config, pending = _read_configure(control, buffer, spec_fds)
        status_socket = str(config.get("status_socket", ""))
        child_module.give_open_files(config.get("open_files"))
        # What nearly every child's spec sets (the pinning of a state without GPUs): set
        # here once, a launch finds it set already.
        os.environ.update({str(k): str(v) for k, v in config.get("child_env", {}).items()})
        preload(config.get("preload", ()), config.get("import_path", ()))
        warm_up()
        # A child that crashes in native code (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) writes
        # the Python stack it was on to its descriptor 2, its log: the failure's traceback.
        # Set once here, every child inherits it with its signal handlers.
        faulthandler.enable(2)
        seccomp.prepare()
        # Objects loaded so far are never collected: children share their pages untouched.
        gc.collect()
        gc.freeze()
        _release_free_heap()
        zygote = Zygote(control, parent, spec_fds, park_max=int(config.get("park_max", PARK_MAX)),
                        park_idle=float(config.get("park_idle", PARK_IDLE)), endpoint=str(config.get("endpoint", "")))
        child_module.note_zygote_pipes()
        write_frame(control, {"op": "ready"})  # warmed up: a run waits for this before its clock starts
        zygote.serve(pending, buffer)
    except (_ParentDied, OSError):
        pass
    finally:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except _ParentDied:
            pass  # a SIGTERM came just as the loop ended; no other can
        if zygote is not None:
            zygote._kill_all(cleanup)
        _kill_left_in(cleanup)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        # The supervisor's process ended without closing its supervisor: its socket's end
        # may come before its exit, which then follows at once.
        if (status_socket and parent is not None and not (zygote is not None and zygote.closed)
                and select.select([parent], [], [], PARENT_EXIT_WAIT)[0]):
            _remove_socket(status_socket)
    return 0


PARENT_EXIT_WAIT = 2.0
"""Seconds the zygote waits for the exit of a supervisor's process whose socket ended
without a ``close``: a process that ends closes its descriptors first."""


def _remove_socket(path: str) -> None:
    """Remove the status socket (:mod:`agent.live`) of the supervisor's process, which has
    ended: it removes its socket as it exits, but one that was killed left it for the next
    endpoint of the user to sweep, which may never start."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
