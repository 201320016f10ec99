"""A worker: one long-lived state process serving attempts one after the other.

Forked by the zygote like any state child and confined, once, in a cgroup sized to the
resource shape it serves (:mod:`agent.supervisor.workers` decides which attempts reach
it). It speaks the child's protocol over one connection for its whole life: each
``hello`` says *ready*, the ``run`` that follows is served by a fresh
:class:`~agent.runtime.session.ChildSession` exactly as a one-attempt child serves it
(context writes, human input, stop and preemption, result or error), and the next
``hello`` says that the state is over and the worker is clean again. The attempt's report
(result, error or checkpoint keys) goes out with that hello, in one write: the
supervisor, which can close the attempt only at the hello, wakes once for both.

Between two states the worker puts back what it can: its working directory, ``argv``,
``sys.path``, umask, recursion limit and environment (the time zone read from it too),
the interpreter's switches (garbage collector, trace, switch interval) and its event
loop's settings (debug, exception handler, task factory),
its stdout and stderr (``sys.stdout`` and the descriptors), its blocked signals, and no alarm or interval timer is left
armed; tasks the state left on the event loop are cancelled; the default thread pool is
shut down. It cannot take back a thread that will not end (one of ``threading``'s or
not), a process the state started and left running (its child, or any other process in
its cgroup), a task that refuses to be cancelled, an environment changed below
``os.environ`` (``os.putenv``), or a change to what the kernel holds for the process:
its scheduling (nice, policy, IO priority), CPUs, resource limits, user and groups,
namespaces, capabilities and the like (:func:`_process_attributes`). Then it exits
instead of saying ready, and the supervisor starts a fresh one when one is needed; a
state's result stands either way. What
stays by design (the heap, imported modules and their globals, open files a state did
not close, signal handlers, the page cache) is the price of reuse and is documented in
``docs/isolation.md``.

A worker idle for ``idle`` seconds exits by itself with :data:`EXIT_IDLE`, which says
that it started nothing after its last ``hello``: a ``run`` that crossed its exit on the
way is given to another worker, not failed. A fresh worker was started for an attempt
that is handed to it once its first ``hello`` is read: it waits at least
:data:`FIRST_RUN_WAIT` for it, however short ``idle`` is (else, with ``idle`` shorter than
that round trip, every worker would exit before its first attempt).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import platform
import resource
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvloop

from .. import _env
from ..errors import ProtocolError
from ..ipc import DealerTransport, Hello, Run, decode_message, encode_message
from ..ipc.messages import FROM_SUPERVISOR
from ..values import Bounds
from .child import take_ready_loop
from .session import ChildSession

EXIT_IDLE = 121
"""The worker was idle for its ``idle`` seconds and started no attempt since its last hello."""

_LEFTOVER_GRACE = 0.1  # seconds for tasks and threads a state left behind to end
FIRST_RUN_WAIT = 2.0
"""Seconds a fresh worker waits for its first ``run`` at least (see the module docstring)."""


def serve_worker(transport: DealerTransport, bounds: Bounds, spec: dict[str, Any], settings: dict[str, Any]) -> int:
    """Serve attempts until idle, told to go, or unable to clean up; returns the exit code."""
    loop = take_ready_loop() or uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(transport, bounds, spec, settings)
    try:
        return loop.run_until_complete(worker.serve())
    finally:
        transport.close()


class Worker:
    """The serving loop of one worker process."""

    def __init__(
        self, transport: DealerTransport, bounds: Bounds, spec: dict[str, Any], settings: dict[str, Any],
    ) -> None:
        self._transport = transport
        self._bounds = bounds
        self._secret = spec["secret"]
        self._context_keys = spec.get("context_keys")
        self._idle = settings.get("idle")
        self._cwd = os.getcwd()
        self._argv = list(sys.argv)
        self._environ = dict(os.environ)
        self._environ_raw = _env.snapshot()
        self._sys_path = list(sys.path)
        self._recursion_limit = sys.getrecursionlimit()
        self._interpreter = _interpreter_settings()
        self._loop_settings = _loop_settings(asyncio.get_event_loop())
        self._policy = asyncio.get_event_loop_policy()
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        self._attributes = _process_attributes()
        self._c_environ = _c_environ()
        self._zone = (time.tzname, time.timezone)
        self._signal_mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        self._streams = (sys.stdout, sys.stderr)
        self._outputs = [_file_id(fd) for fd in (1, 2)]
        self._output_fds = [os.dup(fd) for fd in (1, 2)]  # to put back a state's dup2 over them
        self._hello = encode_message(Hello(pid=os.getpid(), secret=self._secret))
        procs = spec.get("confine", {}).get("cgroup_procs") or ()
        self._cgroup_procs: str | None = procs[0] if procs else None  # its cgroup's processes
        self._threads = self._new_thread_pool()
        self._reader: asyncio.Task[None] | None = None
        self._session: ChildSession | None = None  # the attempt in progress
        self._runs: deque[Run] = deque()  # read before anyone waited for them
        self._waiter: asyncio.Future[Run | None] | None = None  # _next_run's
        self._gone = False  # the channel is closed: no more runs
        self._served = False  # an attempt was started here

    def _new_thread_pool(self) -> ThreadPoolExecutor:
        pool = ThreadPoolExecutor(thread_name_prefix="state")
        asyncio.get_event_loop().set_default_executor(pool)
        return pool

    async def serve(self) -> int:
        reader = self._reader = asyncio.ensure_future(self._read())
        try:
            return await self._serve()
        finally:
            reader.cancel()

    async def _serve(self) -> int:
        report: list[bytes] = []
        while True:
            # Up (the first time), then the last attempt's report and ready again.
            self._transport.send_many([*report, self._hello])
            run = await self._next_run()
            if run is None:
                return EXIT_IDLE
            session = self._session = ChildSession(
                self._transport, pid=os.getpid(), secret=self._secret, bounds=self._bounds,
                context_keys=self._context_keys, reads=False, hold_report=True,
            )
            self._served = True
            try:
                await session.run(run)
            finally:
                self._session = None
            report = [session.report] if session.report is not None else []
            if not await self._clean():
                self._transport.send_many(report)
                return 0  # something of the state will not go: a fresh worker serves the next

    async def _next_run(self) -> Run | None:
        """The next ``run``; None when idle for ``idle`` seconds or the supervisor is gone."""
        if self._runs:
            return self._runs.popleft()
        if self._gone:
            return None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Run | None] = loop.create_future()
        self._waiter = waiter
        idle = self._idle if self._served or not self._idle else max(self._idle, FIRST_RUN_WAIT)
        timer = loop.call_later(idle, _settle, waiter, None) if idle else None
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _read(self) -> None:
        """Read the supervisor's messages for the worker's whole life (one reader, not one per
        attempt): a ``run`` is for :meth:`_next_run`, the rest for the attempt in progress.

        A stop or an answer read between attempts belongs to one that already ended (it
        crossed the end of that attempt on the way): there is nothing left to do with it.
        """
        try:
            while True:
                frame = await self._transport.recv()
                try:
                    msg = decode_message(frame, self._bounds, FROM_SUPERVISOR)
                except ProtocolError as exc:
                    if self._session is None:
                        if self._waiter is not None and not self._waiter.done():
                            self._waiter.set_exception(exc)
                        return
                    self._session.refuse(exc)
                    continue
                if self._session is not None:
                    self._session.deliver(msg)
                elif isinstance(msg, Run):
                    self._runs.append(msg)
                    if self._waiter is not None:
                        _settle(self._waiter, self._runs.popleft())
        except (ConnectionError, ProtocolError) as exc:  # the channel broke, or the supervisor left
            if isinstance(exc, ProtocolError) and self._session is not None:
                self._session.refuse(exc)
            self._gone = True
            if self._waiter is not None:
                _settle(self._waiter, None)

    async def _clean(self) -> bool:
        """Put the process back as the next state expects it; False when it cannot be
        (or when putting it back failed: a fresh worker is then the safe answer)."""
        try:
            return await self._put_back()
        except Exception:
            return False

    async def _put_back(self) -> bool:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # before the hello: the supervisor files output up to it
            except Exception:
                pass
        me = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not me and t is not self._reader]
        if leftovers:
            for task in leftovers:
                task.cancel()
            _, pending = await asyncio.wait(leftovers, timeout=_LEFTOVER_GRACE)
            if pending:
                return False
        if threading.active_count() > 1 and not self._threads_ended():
            return False
        if not await _threads_gone():  # started below threading (_thread.start_new_thread, C code)
            return False
        if _has_live_children() or self._others_in_cgroup():
            return False
        if _process_attributes() != self._attributes:
            return False  # its priority, CPUs, limits, ids or namespaces: not all can be put back
        for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
            if signal.getitimer(timer) != (0.0, 0.0):
                signal.setitimer(timer, 0)  # an alarm left armed would go off in the next state
        if signal.pthread_sigmask(signal.SIG_BLOCK, ()) != self._signal_mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._signal_mask)
        if (sys.stdout, sys.stderr) != self._streams:
            sys.stdout, sys.stderr = self._streams
        for fd, (kept, original) in enumerate(zip(self._output_fds, self._outputs), start=1):
            if _file_id(fd) != original:
                os.dup2(kept, fd)  # the next state's output goes to its log again
        try:
            cwd: str | None = os.getcwd()
        except FileNotFoundError:  # it removed the directory it was in
            cwd = None
        if cwd != self._cwd:
            os.chdir(self._cwd)
        if type(sys.argv) is not list or sys.argv != self._argv:
            sys.argv = list(self._argv)
        if type(sys.path) is not list or sys.path != self._sys_path:
            sys.path = list(self._sys_path)
        if sys.getrecursionlimit() != self._recursion_limit:
            sys.setrecursionlimit(self._recursion_limit)
        if _interpreter_settings() != self._interpreter:
            _put_interpreter_back(self._interpreter)
        loop = asyncio.get_running_loop()
        if asyncio.get_event_loop_policy() is not self._policy:
            asyncio.set_event_loop_policy(self._policy)
            asyncio.set_event_loop(loop)
        if _loop_settings(loop) != self._loop_settings:
            _put_loop_back(loop, self._loop_settings)
        os.umask(self._umask)  # put back whatever it is (reading it means setting it)
        if _env.snapshot() != self._environ_raw:
            os.environ.clear()
            os.environ.update(self._environ)
        if _c_environ() != self._c_environ:
            return False  # changed below os.environ (os.putenv, os.unsetenv): subprocesses would see it
        if (time.tzname, time.timezone) != self._zone:
            time.tzset()  # its TZ is gone from the environment: read it again
            if (time.tzname, time.timezone) != self._zone:
                return False
        return True

    def _others_in_cgroup(self) -> bool:
        """Whether a process besides this one is in its cgroup: one the state started that is
        no longer its child (a daemon that double-forked), which :func:`_has_live_children`
        does not see."""
        if self._cgroup_procs is None:
            return False
        try:
            with open(self._cgroup_procs, "rb") as procs:
                return any(int(pid) != os.getpid() for pid in procs.read().split())
        except (OSError, ValueError):
            return True  # cannot tell: a fresh worker serves the next state

    def _threads_ended(self) -> bool:
        """Shut the state's thread pool down; True once every thread but this one has ended."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._threads = self._new_thread_pool()
        deadline = time.monotonic() + _LEFTOVER_GRACE
        for thread in threading.enumerate():
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        return threading.active_count() == 1


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


_RLIMITS = tuple(sorted({getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}))
_NAMESPACES = tuple(
    f"/proc/self/ns/{kind}" for kind in ("net", "mnt", "ipc", "uts", "user", "cgroup", "pid_for_children"))
_LIBC = ctypes.CDLL(None, use_errno=True)
_IOPRIO_GET = {"x86_64": 252, "aarch64": 31}.get(platform.machine())  # the syscall's number
_ENVIRON = ctypes.POINTER(ctypes.c_char_p).in_dll(_LIBC, "environ")


def _process_attributes() -> tuple[Any, ...]:
    """What a state may change of its process that a worker cannot always put back: its
    scheduling (nice, policy, IO priority), its CPUs, its resource limits, its user and
    groups, its namespaces, its capabilities, no_new_privs, seccomp filters and the like
    (a worker whose attributes changed is retired, so the next state gets them as a fresh
    process would)."""
    return (
        os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0), os.sched_getparam(0).sched_priority,
        _LIBC.syscall(_IOPRIO_GET, 1, 0) if _IOPRIO_GET is not None else None,  # IOPRIO_WHO_PROCESS, itself
        os.sched_getaffinity(0), [resource.getrlimit(r) for r in _RLIMITS],
        os.getresuid(), os.getresgid(), os.getgroups(), [_readlink(path) for path in _NAMESPACES],
        _kernel_status(),
    )


def _kernel_status() -> list[bytes]:
    """What the kernel holds for the process that no call above reads: its capability sets,
    no_new_privs and seccomp mode (``/proc/self/status``), and what ``prctl`` reads back
    (dumpable, keep-caps, securebits, timer slack, THP, child subreaper, the parent-death
    signal the worker relies on) and its personality."""
    global _status
    if _status is None or _status[0] != os.getpid():  # its own, not the zygote's: opened here
        _status = (os.getpid(), os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC))
    fields = [line for line in os.pread(_status[1], 1 << 16, 0).splitlines() if line.startswith(_STATUS_FIELDS)]
    out = ctypes.c_int(0)
    for option in _PRCTL_POINTER_GETS:
        out.value = 0
        _LIBC.prctl(option, ctypes.byref(out), 0, 0, 0)
        fields.append(b"%d=%d" % (option, out.value))
    fields += [b"%d=%d" % (option, _LIBC.prctl(option, 0, 0, 0, 0)) for option in _PRCTL_GETS]
    fields.append(b"personality=%d" % _LIBC.personality(0xFFFFFFFF))
    return fields


_status: tuple[int, int] | None = None  # (pid, descriptor) of /proc/self/status: a pread costs half an open
_STATUS_FIELDS = (b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:", b"CapAmb:", b"NoNewPrivs:", b"Seccomp:",
                  b"Seccomp_filters:", b"Name:")
# PR_GET_DUMPABLE, PR_GET_KEEPCAPS, PR_GET_SECUREBITS, PR_GET_TIMERSLACK, PR_GET_THP_DISABLE
_PRCTL_GETS = (3, 7, 27, 30, 42)
_PRCTL_POINTER_GETS = (1, 37)  # PR_GET_PDEATHSIG, PR_GET_CHILD_SUBREAPER: written to an int


def _interpreter_settings() -> tuple[Any, ...]:
    """The interpreter's switches a state may flip for the whole process: the garbage
    collector (on, thresholds), a trace or profile function, the thread switch interval."""
    return (gc.isenabled(), gc.get_threshold(), sys.gettrace(), sys.getprofile(), sys.getswitchinterval())


def _put_interpreter_back(settings: tuple[Any, ...]) -> None:
    enabled, threshold, trace, profile, interval = settings
    (gc.enable if enabled else gc.disable)()
    gc.set_threshold(*threshold)
    sys.settrace(trace)
    sys.setprofile(profile)
    sys.setswitchinterval(interval)


def _loop_settings(loop: asyncio.AbstractEventLoop) -> tuple[Any, ...]:
    """What a state may set on the event loop that serves the next state too."""
    return (loop.get_debug(), getattr(loop, "slow_callback_duration", None), loop.get_exception_handler(),
            loop.get_task_factory())


def _put_loop_back(loop: asyncio.AbstractEventLoop, settings: tuple[Any, ...]) -> None:
    debug, slow, handler, factory = settings
    loop.set_debug(debug)
    if slow is not None:
        loop.slow_callback_duration = slow  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
    loop.set_task_factory(factory)


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _c_environ() -> frozenset[bytes]:
    """The process's environment as the C library holds it (what a subprocess inherits)."""
    out = []
    i = 0
    while (entry := _ENVIRON[i]) is not None:
        out.append(entry)
        i += 1
    return frozenset(out)


def _file_id(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def _threads_gone() -> bool:
    """Whether no thread but this one (and libuv's pool) runs, within :data:`_LEFTOVER_GRACE`:
    a thread just joined may still be listed by the kernel for a moment."""
    deadline = time.monotonic() + _LEFTOVER_GRACE
    while _other_threads():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


def _other_threads() -> bool:
    """Whether a thread besides this one runs that is not one of libuv's own pool."""
    tasks = os.listdir("/proc/self/task")
    if len(tasks) == 1:
        return False
    me = str(threading.get_native_id())
    for task in tasks:
        if task == me:
            continue
        try:
            with open(f"/proc/self/task/{task}/comm", "rb") as comm:
                if comm.read().strip() != b"libuv-worker":
                    return True
        except OSError:  # it ended meanwhile
            continue
    return False


def _has_live_children() -> bool:
    """Reap the state's exited child processes; True when one is still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
