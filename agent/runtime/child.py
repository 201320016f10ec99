"""A state child from fork to exit: process setup, confinement, then the session.

Runs in a process forked by the zygote. It dies with the zygote (parent-death
signal), writes its stdout/stderr to the attempt's log file, joins its cgroups before
anything else runs, enters its sandbox (if any) after the state's code is loaded and
before it runs, and always leaves through ``os._exit`` so nothing inherited from the
zygote runs at exit.
"""

from __future__ import annotations

import _signal
import asyncio
import ctypes
import inspect
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

import uvloop

from ..ipc import DealerTransport
from ..values import FRAME_OVERHEAD, Bounds, unpack_plain
from . import confine
from .session import ChildSession

_SPEC_BOUNDS = Bounds(max_frame=16 * 1024 * 1024)

EXIT_OK = 0
EXIT_SETUP_FAILED = 120
"""The child could not start (confinement, log file or channel): see its log."""

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits."""
    if _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def child_main(packed_spec: bytes, parent_pid: int, inherited_fds: list[int]) -> NoReturn:
    """Become the child described by ``packed_spec`` (msgpack, from the supervisor); never return.

    The spec arrives packed and is unpacked here: the zygote then allocates nothing per
    child, and every page it writes between forks is a copy-on-write fault.
    """
    code = EXIT_SETUP_FAILED
    try:
        spec = unpack_plain(packed_spec, _SPEC_BOUNDS)
        set_parent_death_signal()
        if os.getppid() != parent_pid:
            os._exit(EXIT_SETUP_FAILED)
        reset_signals()
        for fd in inherited_fds:
            os.close(fd)
        os.setpgid(0, 0)
        # The log is opened before confinement: a sandbox may no longer reach its directory.
        log_fd = os.open(spec["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        confine_before_connect(spec["confine"])
        sys.path[:] = spec["sys_path"]
        sys.argv[:] = spec["argv"]  # the supervisor's, not the zygote's
        try:
            os.chdir(spec["cwd"])
        except OSError:
            pass
        # Connect and say hello first: the supervisor answers while the loop is being built.
        # No routing id of our own: the ROUTER gives each connection one, so no other process
        # can take over or block this one's; the secret travels in the hello.
        transport = DealerTransport(
            spec["endpoint"], b"", max_frame=spec["max_frame"] + FRAME_OVERHEAD,
            peer_hwm=spec["receive_hwm"],
        )
        session = ChildSession(
            transport, pid=os.getpid(), secret=spec["secret"], bounds=Bounds(max_frame=spec["max_frame"]),
            before_run=lambda: confine_before_run(spec["confine"]),
        )
        session.hello()
        # A loop of its own, never closed: the process ends with os._exit right after.
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(session, transport))
        code = EXIT_OK
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


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


_SPLIT_SANDBOX = "sandbox" in inspect.signature(confine.apply).parameters


def confine_before_connect(child_spec: dict[str, Any]) -> None:
    """Cgroups, limits and environment now; a sandbox only leaves the network here.

    The network namespace belongs to threads, so it is left while the process has only
    one (the child's DEALER starts none); the uid drop waits until the state's code is loaded
    (:func:`confine_before_run`), while the private directories are still readable.
    """
    if not _SPLIT_SANDBOX:
        confine.apply(child_spec)
        return
    confine.apply(child_spec, sandbox=False)
    sandbox = child_spec.get("sandbox")
    if sandbox is not None and not sandbox.get("network", False):
        from .sandbox import isolate_network

        isolate_network()


def confine_before_run(child_spec: dict[str, Any]) -> None:
    """Enter the sandbox, if any, once the state function and its modules are loaded."""
    if _SPLIT_SANDBOX:
        confine.enter_sandbox(child_spec)  # type: ignore[attr-defined]


async def serve(session: ChildSession, transport: DealerTransport) -> None:
    """Serve the attempt, then close the channel."""
    try:
        await session.run()
    finally:
        await transport.aclose()
