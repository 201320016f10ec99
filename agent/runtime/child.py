"""A state child from fork to exit: process setup, confinement, then the session.

Runs in a process forked by the zygote (or parked by it, waiting for its spec). It dies
with the zygote (parent-death signal), connects to the supervisor first (the handshake
then completes while it sets up), writes its stdout/stderr to the attempt's log file,
joins its cgroups before any state code runs, leaves the machine's namespaces once
connected and enters its sandbox (if any) after the state's code is loaded and before it
runs, and always leaves through ``os._exit`` so nothing inherited from the zygote runs at
exit. The spec's memfd also carries the attempt's ``run`` message (read once confined, so
that its pages are the attempt's), so nothing waits on the supervisor between the fork
and the state; the child keeps its connection open until the supervisor has believed
its hello (:class:`~agent.ipc.Welcome`).
"""

from __future__ import annotations

import _signal
import asyncio
import ctypes
import gc
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import traceback
from typing import Any, Callable, NoReturn

import msgpack
import uvloop

from ..ipc import DealerTransport
from ..errors import ProtocolError
from ..ipc.zmtp import LINGER, connect
from ..values import FRAME_OVERHEAD, Bounds, pack_plain
from . import confine, main_module
from .session import ChildSession

_SPEC_MAX = 16 * 1024 * 1024  # bytes of a spec, at most
_MAX_GIVEN = 2  # descriptors a spec comes with: its output pipe, and a worker's channel
_ready_loop: asyncio.AbstractEventLoop | None = None  # a parked child's event loop, made ahead
_open_files: tuple[int, int] | None = None  # RLIMIT_NOFILE each child takes (give_open_files)
_zygote_pipes: frozenset[int] = frozenset()  # inodes of the zygote's pipes (note_zygote_pipes)

EXIT_OK = 0
EXIT_SETUP_FAILED = 120
"""The child could not start (confinement, log file or channel): see its log."""

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_GET_NAME = 16
_prctl = ctypes.CDLL(None, use_errno=True).prctl
PARKED_NAME = b"agent-parked"
"""A parked child's process name (``ps``, ``/proc/PID/comm``) from its fork until a launch
takes it: the zygote forks it under that name, so no observer sees it nameless."""


def process_name() -> bytes:
    """This thread's name (``/proc/self/comm``)."""
    name = ctypes.create_string_buffer(16)
    _prctl(_PR_GET_NAME, name, 0, 0, 0)
    return name.value


def set_process_name(name: bytes) -> None:
    """Rename this thread (at most 15 bytes are kept)."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits."""
    if _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def give_open_files(soft: int | None) -> None:
    """Have every child forked from now on take ``soft`` as its soft limit of open files: the
    supervisor's process had it before it raised its own (:mod:`agent.supervisor.descriptors`)."""
    global _open_files
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    _open_files = None if soft is None or soft == limits[0] else (min(soft, limits[1]), limits[1])


def _restore_open_files() -> None:
    if _open_files is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, _open_files)


def child_main(
    spec_fd: int, zygote_pidfd: int | None, zygote_fds: list[int], notify_fd: int | None,
    namespaces: list[int] | None = None, given: list[int] | None = None,
) -> NoReturn:
    """Become the child whose spec (msgpack, from the supervisor) is in ``spec_fd``; never return.

    The spec is read here, after the fork, so the zygote never holds it (see
    :mod:`agent.runtime.zygote`). ``zygote_fds`` are the zygote's own descriptors; a
    sandboxed child (``notify_fd`` is its socket for the seccomp listener, ``namespaces``
    the network and IPC namespaces made for it, if any) closes every descriptor but its
    own instead. ``given`` are descriptors the supervisor sent with the spec (a worker's
    channel).
    """
    code = EXIT_SETUP_FAILED
    try:
        set_parent_death_signal()
        if zygote_pidfd is not None and select.select([zygote_pidfd], [], [], 0)[0]:
            os._exit(EXIT_SETUP_FAILED)  # the zygote died before the death signal was set
        spec = read_spec(spec_fd)
        reset_signals()
        _restore_open_files()
        sandboxed = notify_fd is not None
        _leave_zygote(zygote_fds, [spec_fd, notify_fd, *(namespaces or ()), *(given or ())] if sandboxed else None)
        code = _serve(spec, spec_fd, notify_fd, namespaces, given)
    except confine.CgroupGone:
        pass  # its attempt was stopped before it began: nothing to tell (its exit says it)
    except BaseException:
        _print_exception()
    finally:
        _exit(code)


def park(
    sock_fd: int, zygote_pidfd: int | None, zygote_fds: list[int],
    warm_up: Callable[[asyncio.AbstractEventLoop], None], endpoint: str = "", name: bytes = b"python",
    sandbox: tuple[int | None, list[int]] | None = None,
) -> NoReturn:
    """Be a parked child: do what every child does first, then wait for a spec; never return.

    The spec's descriptor arrives over ``sock_fd`` (``SCM_RIGHTS``) when a launch takes
    this child; when the zygote closes the socket instead, the child exits. Nothing of a
    state has run here before: a parked child is as fresh as one forked for its launch.
    Meanwhile it connects to the supervisor at ``endpoint`` (if any), whose half of the
    handshake then waits in the socket, and warms up on its own event loop, which then
    serves the attempt, unless its spec came already or the cores are busy
    (:func:`cores_busy`). Once launched it takes ``name`` (the zygote's) instead of
    :data:`PARKED_NAME`. A child parked for a sandboxed launch
    (``sandbox``: its socket for the seccomp listener and the namespaces made for it, as
    :func:`child_main` gets them) keeps only those descriptors, starts a session of its
    own, and serves only a sandboxed spec.
    """
    global _ready_loop
    code = EXIT_SETUP_FAILED
    try:
        set_parent_death_signal()
        if zygote_pidfd is not None and select.select([zygote_pidfd], [], [], 0)[0]:
            os._exit(EXIT_SETUP_FAILED)
        reset_signals()
        _restore_open_files()
        notify_fd, namespaces = sandbox if sandbox is not None else (None, None)
        keep = [sock_fd, *([notify_fd] if notify_fd is not None else []), *(namespaces or ())]
        _leave_zygote(zygote_fds, keep if sandbox is not None else None)
        connected = _connect_ahead(endpoint)
        # Its own loop, made while nothing waits for it (a sandbox's is asyncio's: libuv's
        # io_uring is denied there).
        _ready_loop = uvloop.new_event_loop() if sandbox is None else asyncio.SelectorEventLoop()
        if not select.select([sock_fd], [], [], 0)[0] and not cores_busy():
            # The pages an attempt writes are copied now, while nothing waits for them, on
            # the loop that will serve it; what the warm-up left (its channel) is collected
            # now, not during a state.
            warm_up(_ready_loop)
            gc.collect()
        else:
            _ready_loop.run_until_complete(_nothing())  # a loop's first run sets it up (0.2 ms for uvloop's)
        channel = _channel_ahead(connected, endpoint)
        if sandbox is not None:  # a sandbox's namespaces and filesystem view, made ahead too
            from . import sandbox as sandbox_module

            sandbox_module.make_view_ahead(sandbox_module.DEFAULT_VIEW, namespaces)
            namespaces = None
        asyncio.set_event_loop(_ready_loop)
        # The spec is waited for inside a run of the loop: starting a run (uvloop makes a
        # socketpair for signals each time) then happens before the launch, not after it.
        launched = _ready_loop.run_until_complete(
            _serve_parked(sock_fd, name, sandbox is not None, notify_fd, namespaces, channel))
        if isinstance(launched, int):
            code = launched
        else:  # a worker's spec: the worker runs the loop itself
            spec, fds = launched
            code = _serve(spec, fds[0], notify_fd, namespaces, fds[1:], channel, parked=True)
    except confine.CgroupGone:
        pass  # as in child_main
    except BaseException:
        _print_exception()
    finally:
        _exit(code)


_BUSY_WAIT_RATIO = 1.5
"""A parked child whose wait for a core since its fork exceeds this many times its run
time finds the cores busy (the ratio is 0.2-0.6 where cores are idle between launches,
above 2 in most children of a chain of no-op states on two cores)."""


def cores_busy(schedstat: str = "/proc/self/schedstat") -> bool:
    """Whether this process waited for a core (since its fork) much longer than it ran.

    A parked child's warm-up spends idle CPU to cut its launch's latency; where no core is
    idle, it would take that CPU from running states instead (a chain of small states on
    two cores ran 5-10% slower for it), so a child that finds the cores busy skips it.
    False where the kernel keeps no such counts.
    """
    try:
        with open(schedstat, "rb") as counts:
            ran, waited = (int(field) for field in counts.read().split()[:2])
    except (OSError, ValueError):
        return False
    return waited > _BUSY_WAIT_RATIO * ran


async def _nothing() -> None:
    return None


async def _serve_parked(
    sock_fd: int, name: bytes, sandboxed: bool, notify_fd: int | None, namespaces: list[int] | None,
    connected: DealerTransport | None,
) -> int | tuple[dict[str, Any], list[int]]:
    """Wait for the spec (blocking the loop: nothing else is on it), then serve the attempt
    in this run of the loop; the exit code, or a worker's spec and descriptors to serve it with."""
    sock = socket.socket(fileno=sock_fd)
    _, fds, _, _ = socket.recv_fds(sock, 16, _MAX_GIVEN + 1)
    sock.close()
    if not fds:
        os._exit(EXIT_OK)  # let go: no launch needed it
    set_process_name(name)
    spec = read_spec(fds[0])
    if ("sandbox" in spec["confine"]) != sandboxed:
        raise OSError("a sandboxed launch must take a child parked for one, and only it")
    if spec.get("worker") is not None:
        return spec, fds
    served = _set_up(spec, fds[0], notify_fd, namespaces, fds[1:], connected, parked=True)
    if isinstance(served, int):
        return served
    await serve(*served, welcome=True)
    return EXIT_OK


def _channel_ahead(sock: socket.socket | None, endpoint: str) -> DealerTransport | None:
    """A parked child's channel on its connection made ahead, the supervisor's half of the
    handshake read if it came already (None: no connection, or a broken one)."""
    if sock is None:
        return None
    channel = DealerTransport.over(sock, b"", announced=True, endpoint=endpoint, linger=0)
    try:
        channel.read_handshake_ahead()
    except (OSError, ProtocolError):
        sock.close()
        return None
    return channel


def _connect_ahead(endpoint: str) -> socket.socket | None:
    """A parked child's connection to the supervisor, made while it waits (None: none made)."""
    if not endpoint:
        return None
    try:
        return connect(endpoint)
    except OSError:
        return None  # it connects when launched, as a child forked for its launch does


def note_zygote_pipes() -> None:
    """Remember the zygote's pipes (called by the zygote once it made its own), so that a
    sandboxed child tells them from pipes made in it since its fork (:func:`_leave_zygote`)."""
    global _zygote_pipes
    _zygote_pipes = frozenset(_pipes().values())


def _pipes() -> dict[int, int]:
    """This process's pipe descriptors, with their inodes."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if stat.S_ISFIFO(st.st_mode):
            out[int(name)] = st.st_ino
    return out


def _leave_zygote(zygote_fds: list[int], keep: list[int] | None) -> None:
    """Drop what the fork inherited: a sandboxed child closes every descriptor but stdio and
    ``keep`` and starts a session of its own (no controlling terminal); another closes
    the zygote's own descriptors and leads a process group.

    A sandboxed child also keeps the pipes made in it since the fork: libuv's fork handler
    makes one (its signal lock) and remembers its numbers, and closes and remakes whatever
    holds those numbers at the process's next fork. Closed, the numbers would go to the
    state's own files, and every fork in the state (``multiprocessing``, ``os.fork``)
    would close two of them in the new process."""
    if keep is not None:
        made_here = [fd for fd, inode in _pipes().items() if inode not in _zygote_pipes]
        _close_all_but(0, 1, 2, *keep, *made_here)
        os.setsid()
    else:
        for fd in zygote_fds:
            os.close(fd)
        os.setpgid(0, 0)


def _serve(
    spec: dict[str, Any], spec_fd: int, notify_fd: int | None, namespaces: list[int] | None,
    given: list[int] | None, connected: DealerTransport | None = None, *, parked: bool = False,
) -> int:
    """Channel, log, confinement, then the attempt (or, for a worker, attempts); the exit code.

    ``parked``: this child was parked; ``connected``: its connection to the supervisor
    made ahead, used when it goes where the spec says."""
    served = _set_up(spec, spec_fd, notify_fd, namespaces, given, connected, parked=parked)
    if isinstance(served, int):
        return served  # a worker's, served
    # A loop of its own, never closed: the process ends with os._exit right after (a parked
    # child serves its attempt in the loop it made ahead: _serve_parked). A sandbox's is
    # asyncio's: libuv's io_uring is denied by its seccomp filter.
    loop = uvloop.new_event_loop() if "sandbox" not in spec["confine"] else asyncio.SelectorEventLoop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(serve(*served, welcome=True))
    return EXIT_OK


def _set_up(
    spec: dict[str, Any], spec_fd: int, notify_fd: int | None, namespaces: list[int] | None,
    given: list[int] | None, connected: DealerTransport | None, *, parked: bool,
) -> tuple[ChildSession, DealerTransport] | int:
    """Channel, log and confinement; the attempt's session and its transport, or, for a
    worker, the exit code once it served its attempts. ``given``: the write end of the
    supervisor's pipe for this process's output, then a worker's own channel."""
    # First: what this process does from now on is counted and limited (and a process that
    # leaves its cgroup is told by what it was charged outside, which then stays small).
    confine.join(spec["confine"], parked=parked)
    sandbox = spec["confine"].get("sandbox")
    max_frame = spec["max_frame"] + FRAME_OVERHEAD
    if not given:
        raise OSError("the spec came without the pipe for this process's output")
    output, *own_channel = given
    if connected is not None and (own_channel or spec["endpoint"] != connected.endpoint):
        connected.close()  # at once: it sent nothing, and lingers for nothing
        connected = None
    # No routing id of our own: a worker's channel is its own socketpair, and a child's
    # connection gets one from the ROUTER that no other process can take over or block;
    # the secret travels in the hello.
    if own_channel:
        # A worker's: the supervisor's greeting is already there. Its socketpair keeps what
        # was sent for the supervisor after this end closes, so nothing lingers (an idle
        # worker exits at once, also while no event loop serves the supervisor).
        transport = DealerTransport.over(socket.socket(fileno=own_channel[0]), b"", max_frame=max_frame, linger=0)
    elif connected is not None:  # connected while parked: the handshake is over already
        transport = connected
        transport.set_bounds(max_frame=max_frame, peer_hwm=spec["receive_hwm"], linger=LINGER)
    else:  # connect first: the supervisor's end answers the handshake while the rest is set up
        transport = DealerTransport(spec["endpoint"], b"", max_frame=max_frame, peer_hwm=spec["receive_hwm"])
    bounds = Bounds(max_frame=spec["max_frame"])
    worker = spec.get("worker")
    before_run = None
    if sandbox is not None:
        from . import sandbox as sandbox_module

        notify = socket.socket(fileno=notify_fd) if notify_fd is not None else None
        before_run = lambda: sandbox_module.enter_sandbox(sandbox, notify)  # noqa: E731
    channel = FirstFrame(transport)
    session = ChildSession(
        channel, pid=os.getpid(), secret=spec["secret"], bounds=bounds,
        before_run=before_run, context_keys=spec.get("context_keys"),
    )
    # Its output goes to the supervisor's pipe, whose write end came with the spec.
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    os.close(null_fd)
    if connected is not None and worker is None:
        # The handshake is over: the supervisor's welcome comes back while this process
        # sets up, instead of after its state (a child may close only once welcomed).
        session.hello()
    confine.apply(spec["confine"], joined=True)
    if sandbox is not None:  # before the state's modules load: they see only the sandbox's variables
        sandbox_module.wipe_environment(sandbox)
    # The run message (the state and its context snapshot: it may take the whole frame cap)
    # is read only now, so that its pages are charged to the attempt's cgroup.
    run = read_run(spec_fd, spec)
    os.close(spec_fd)
    sys.path[:] = spec["sys_path"]
    sys.argv[:] = spec["argv"]  # the supervisor's, not the zygote's
    main_module.stand_in(spec.get("main"))  # the program's __main__, not the zygote's
    try:
        os.chdir(spec["cwd"])
    except OSError:
        pass
    if worker is not None:
        from .worker import serve_worker

        return serve_worker(transport, bounds, spec, worker)
    # The attempt's run message came with the spec: no round trip to the supervisor for it.
    channel.first = run
    session.hello()
    if sandbox is not None and not sandbox_module.view_made_ahead():
        sandbox_module.leave_namespaces(sandbox, namespaces)  # while the supervisor answers
    return session, transport


class FirstFrame:
    """A child's channel whose first received frame is one it already holds (its ``run``)."""

    def __init__(self, transport: DealerTransport, first: bytes | None = None) -> None:
        self._transport = transport
        self.first = first

    def send(self, frame: bytes) -> None:
        self._transport.send(frame)

    async def recv(self) -> bytes:
        if self.first is not None:
            frame, self.first = self.first, None
            return frame
        return await self._transport.recv()

    async def aclose(self) -> None:
        return None  # the connection is closed by its owner


def take_ready_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop this process made while it was parked, if any (once)."""
    global _ready_loop
    loop, _ready_loop = _ready_loop, None
    return loop


def _print_exception() -> None:
    try:
        traceback.print_exc()
    except BaseException:
        pass


def _exit(code: int) -> NoReturn:
    """Flush what the process printed and leave, running nothing inherited from the zygote."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)


SPEC_HEADER = struct.Struct("!Q")
"""A spec memfd holds the spec's size, the spec (plain msgpack), then the ``run`` message."""


def spec_memfd(spec: dict[str, Any]) -> int:
    """A memfd holding ``spec``, then its run message (``spec["run"]``, read by the child
    once it is confined): what the supervisor hands a child (:func:`read_spec` reads it)."""
    fd = os.memfd_create("agent-child-spec", os.MFD_CLOEXEC)
    try:
        head = pack_plain({k: v for k, v in spec.items() if k != "run"})
        _write_all(fd, SPEC_HEADER.pack(len(head)) + head)
        run = spec.get("run")
        if run:
            _write_all(fd, run)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_spec(fd: int) -> dict[str, Any]:
    """The spec the supervisor wrote into memfd ``fd`` (only the zygote passed it on), without
    the run message that follows it (:func:`read_run`, once confined)."""
    header = os.pread(fd, SPEC_HEADER.size, 0)
    if len(header) != SPEC_HEADER.size:
        raise OSError("the spec is truncated")
    (size,) = SPEC_HEADER.unpack(header)
    if size > _SPEC_MAX:
        raise OSError(f"the spec takes {size:,} bytes, over {_SPEC_MAX:,}")
    data = os.pread(fd, size, SPEC_HEADER.size)
    if len(data) != size:
        raise OSError(f"the spec is {size} bytes but {len(data)} could be read")
    # Plain msgpack, without the bounds a frame from a state gets: the supervisor wrote it.
    try:
        spec: dict[str, Any] = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise OSError(f"the spec is malformed: {exc}") from None
    spec["run_at"] = SPEC_HEADER.size + size
    return spec


def read_run(fd: int, spec: dict[str, Any]) -> bytes | None:
    """The run message after the spec in memfd ``fd`` (None: none came, as for a worker)."""
    start = spec["run_at"]
    size = os.fstat(fd).st_size - start
    if size <= 0:
        return None
    data = os.pread(fd, size, start)
    if len(data) != size:
        raise OSError(f"the run message is {size} bytes but {len(data)} could be read")
    return data


def _close_all_but(*keep: int) -> None:
    """Close every descriptor of this process except ``keep``."""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def reset_signals() -> None:
    """Default signal handling, as a fresh process has; SIGTERM unblocked (the zygote blocks it).

    Through ``_signal``, the C module under :mod:`signal`: the wrappers turn each
    previous handler into an enum member, raising and catching ``ValueError`` for the
    zygote's Python handlers, which costs a third of a millisecond per child.
    """
    _signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, (signal.SIGTERM,))


_WELCOME_WAIT = 10.0  # seconds; the supervisor answers a hello as soon as it reads it


async def serve(session: ChildSession, transport: DealerTransport, *, welcome: bool = False) -> None:
    """Serve the attempt, then close the channel: with ``welcome``, not before the supervisor
    believed the hello (:class:`~agent.ipc.Welcome`).

    Once the attempt has reported, this process yields the CPU. Its report woke the
    supervisor's I/O thread, and the kernel queues a thread woken over a local socket on
    the waker's CPU, where this process would go on closing and exiting (half a
    millisecond or more) before that thread may read the report. Measured in a chain of
    20 ms states, the supervisor then read a report about 1.2 ms after it was sent in half
    of the transitions; with the yield, 0.3-0.4 ms.
    """
    try:
        await session.run()
        os.sched_yield()  # the report is sent: what is left here can wait (see above)
        if welcome:
            await session.welcomed(_WELCOME_WAIT)
    finally:
        await transport.aclose()
