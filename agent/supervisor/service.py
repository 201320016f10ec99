"""The supervisor: one per Python process, shared by every isolated attempt in it.

It owns a private 0700 directory for the ``ipc://`` socket, the ROUTER channel, the
zygote, the per-attempt log directory and the :class:`Confiner`. It starts with the
first isolated attempt, stays warm between runs, moves to the caller's event loop
when a new run starts on another loop, and is torn down at interpreter exit, or
when its zygote dies (the next attempt then starts a new one).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import os
import re
import secrets
import shutil
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import psutil

from .. import _env, values
from .._stdio import open_standard_streams
from .._loops import call_on, grant_soon, outside_caller
from ..errors import CgroupError, IsolationError, ProtocolError, UnsendableStateError
from ..executor import Attempt, Isolation
from ..ipc import Hello, Run, decode_message, encode_message
from ..ipc.router import RECEIVE_HWM, RouterChannel, peer_credentials
from ..runtime import main_module
from ..runtime.sandbox import ENV_KEEP
from ..runtime.zygote import PARK_IDLE, PARK_MAX
from ..context import encode_snapshot
from ..scope import ContextScope, ScopedContext, scope_for
from ..values import Bounds
from .child import ChildProcess, ChildStatus, sent_by
from .confinement import Confinement, Confiner
from .descriptors import Budget, raise_soft_limit
from .launcher import ZygoteLauncher
from .logger import get_logger
from .logs import AttemptLogs, LogRetention, activate, deactivate
from .private_dirs import make_private_dir
from .teardown import at_exit
from .output import AttemptOutput, label_for
from .parked import ParkedChildren
from .pickled import PickledFunctions, dumps, unsendable
from .workers import WorkerPool


def _env_modules(name: str) -> tuple[str, ...]:
    return tuple(m for m in re.split(r"[\s,]+", os.environ.get(name, "")) if m)


@dataclass(frozen=True)
class SupervisorConfig:
    """Settings of the process's supervisor (defaults from the environment)."""

    max_frame: int = field(default_factory=values.max_frame_from_env)
    grace: float = field(default_factory=lambda: _env.seconds("AGENT_STOP_GRACE", 2.0))
    max_launching: int = field(
        default_factory=lambda: _env.count("AGENT_MAX_LAUNCHING", 8 * (os.cpu_count() or 1), least=1)
    )
    log_dir: str | None = None
    preload: tuple[str, ...] = field(default_factory=lambda: _env_modules("AGENT_PRELOAD"))
    """Modules the zygote imports before it forks, so that children inherit them."""
    park_max: int = field(default_factory=lambda: _env.count("AGENT_PARKED_MAX", PARK_MAX))
    """Children the zygote keeps forked ahead, at most (0: none; see :mod:`agent.runtime.zygote`)."""
    park_idle: float = field(default_factory=lambda: _env.seconds("AGENT_PARKED_IDLE", PARK_IDLE))
    """Seconds without a launch after which the zygote lets its parked children go."""


@dataclass(frozen=True)
class SupervisorStatistics:
    """A snapshot of what the supervisor has seen."""

    zygote_pid: int | None
    children_started: int
    children_running: int
    """State processes serving an attempt, or starting to (workers serving none, idle or still
    starting, are not counted)."""
    frames_dropped: int
    protocol_violations: int
    bounds_exceeded: int
    workers: int = 0
    """Live worker processes (``isolation="worker"``), busy or idle."""
    workers_idle: int = 0
    parked: int = 0
    """Children the zygote holds forked ahead, waiting for a launch."""


class Supervisor:
    """Launches and watches state children for this process."""

    def __init__(self, config: SupervisorConfig | None = None, confiner: Confiner | None = None) -> None:
        open_standard_streams()  # before any socket of ours could take descriptor 0, 1 or 2
        self.config = config or SupervisorConfig()
        retention = LogRetention.from_env()  # every setting read before anything is made
        self.bounds = Bounds(max_frame=self.config.max_frame)
        self.pickled = PickledFunctions()  # each state function's pickle, while still the same
        self.log = get_logger("agent.supervisor")
        open_files = raise_soft_limit()  # see .descriptors; state processes get this one back
        with contextlib.ExitStack() as undo:  # a start that fails leaves nothing behind
            self.confiner = confiner or Confiner()
            if confiner is None:
                undo.callback(self.confiner.close)
            self.ipc_dir = make_private_dir("ipc")
            undo.callback(shutil.rmtree, self.ipc_dir, ignore_errors=True)
            self.logs = AttemptLogs(self.config.log_dir, retention)
            undo.callback(self.logs.remove)
            self.router = RouterChannel(
                self.ipc_dir, max_frame=self.config.max_frame,
                on_frame=self._on_frame, on_disconnect=self._on_disconnect,
            )
            undo.callback(self.router.close)
            # What the zygote removes once it has killed its children, should this process end
            # without doing it (kill -9, a multiprocessing worker's os._exit): its directories
            # and its cgroups (empty by then; rmdir is all a cgroup takes).
            cleanup = [self.ipc_dir, *([self.logs.directory] if self.logs.owned else []),
                       *self.confiner.backend.owned_dirs()]
            self.zygote = ZygoteLauncher(
                self._on_report, self._on_zygote_lost, cleanup,
                preload=self.config.preload, import_path=list(sys.path), park_max=self.config.park_max,
                park_idle=self.config.park_idle,
                endpoint=self.router.endpoint, open_files=open_files,
            )
            undo.pop_all()  # started: shutdown() undoes it from now on
        activate(self.logs)
        self._ids = itertools.count(1)
        self._uid = os.getuid()
        self._by_secret: dict[bytes, ChildProcess] = {}
        self._by_route: dict[bytes, ChildProcess] = {}
        self._by_request: dict[int, ChildProcess] = {}
        self._by_pid: dict[int, ChildProcess] = {}
        self._by_fd: dict[int, ChildProcess] = {}
        self._queued: dict[int, tuple[dict[str, Any], bool, tuple[int, ...]]] = {}
        self._outputs: dict[int, AttemptOutput] = {}  # request id -> the child's output pipe
        self._launching: set[int] = set()
        # Parked children handed a spec whose start the zygote is not told of yet (see launched).
        self._untold: dict[int, tuple[int, bool]] = {}  # request id -> (pid, sandboxed)
        self.budget = Budget.now(parked=2 * self.config.park_max)  # plain and sandboxed
        self._state_children: set[int] = set()  # request ids of state processes, live or starting
        self._reserved = 0  # rooms kept for woken waiters until they launch
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.parked: set[int] = set()  # pids of the zygote's parked children
        self.parked_children = ParkedChildren(self.confiner, lambda: self.router.loop, self.log)
        self.workers = WorkerPool(self)
        self._started = 0
        self._active = 0
        self._dropped = 0
        self._violations = 0
        self._bounds_exceeded = 0
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self.ready = False  # its zygote said it can fork (until_ready)
        self._awaiting_ready: list[asyncio.Future[None]] = []
        self.closed = False
        self.log.info("supervisor_started", zygote_pid=self.zygote.pid, ipc_dir=self.ipc_dir)

    # --- attempts ------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on ``loop``; refuses while another loop that still runs uses it (see
        :func:`serving_supervisor`). What a stopped loop left running is failed."""
        current = self.router.loop
        if current is not None and current is not loop:
            if not self.free_for(loop):
                raise IsolationError(
                    "this supervisor serves another event loop that still runs: "
                    "take one with serving_supervisor()"
                )
            if self._busy():
                self._fail_all(None, keep_idle=True)
        outside_caller(self._serve_on, loop)
        if current is not loop:
            self.parked_children.settle()  # what the last loop stopped before taking in

    def _serve_on(self, loop: asyncio.AbstractEventLoop) -> None:
        self.router.attach(loop)
        self.zygote.attach(loop)
        self.workers.attach(loop)

    def free_for(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether this supervisor may serve ``loop``: it serves no other loop that still runs.

        A loop that runs (another thread's, most likely) keeps its supervisor, even idle:
        its timers and callbacks still act on it from that thread.
        """
        current = self.router.loop
        return current is None or current is loop or current.is_closed() or not current.is_running()

    def _busy(self) -> bool:
        return any(not getattr(child, "idle", False) for child in list(self._by_secret.values()))

    def launch(self, attempt: Attempt, confinement: Confinement) -> ChildProcess:
        """Ask the zygote for a child serving ``attempt``; returns at once."""
        self.check_open()
        sandboxed = "sandbox" in confinement.child_spec
        scope = self.scope(attempt)
        secret = secrets.token_bytes(16)
        request_id = self.next_request_id()
        run_frame = self.run_frame(attempt)
        log_path = self.logs.path(attempt.run_id, attempt.state_name, attempt.number)
        child = ChildProcess(
            self, attempt, confinement, secret=secret, request_id=request_id,
            log_path=log_path, run_frame=None, bounds=self.bounds,
        )
        # A sandbox's log is capped like its files (RLIMIT_FSIZE cannot see a pipe).
        cap = confinement.child_spec.get("sandbox", {}).get("rlimits", {}).get("fsize")
        output = AttemptOutput(asyncio.get_running_loop(), log_path, self.logs.create,
                               label_for(attempt.state_name, attempt.number),
                               cap=cap, on_cap=child.log_over_cap, plain=sandboxed)
        # The run message goes with the spec: the child starts the state without asking.
        spec = self.child_spec(secret, confinement, scope, sandboxed=sandboxed, run=run_frame)
        self._state_children.add(request_id)
        self.start(child, spec, output, sandboxed=sandboxed)
        return child

    async def room_for_child(self) -> None:
        """Wait until one more state process fits the budget of open files (see
        :mod:`.descriptors`); those that wait start in the order they came. The caller
        launches it right away (no ``await`` in between)."""
        if not self._room_waiters and self._has_room():
            return
        if not self._room_waiters:
            self.log.info("state_processes_wait", running=len(self._state_children), most=self.budget.children,
                          why="the open-files limit (ulimit -n) leaves room for no more at once")
        waiter = asyncio.get_running_loop().create_future()
        self._room_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and not self.closed:  # woken with a room kept for it
                self._reserved -= 1
                self._make_room()  # passed on to the next one
            else:
                self._room_waiters.remove(waiter)
            raise
        if not self.closed:
            self._reserved -= 1
        self.check_open()

    def _has_room(self) -> bool:
        return len(self._state_children) + self._reserved < self.budget.children

    def _make_room(self) -> None:
        """Wake the longest waiting state processes that now fit, keeping a room for each
        until it launches (or every one, once shut down: they are told so)."""
        while self._room_waiters and (self.closed or self._has_room()):
            waiter = self._room_waiters.popleft()
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)
                if not self.closed:
                    self._reserved += 1

    def confine(self, attempt: Attempt, *, name: str | None = None) -> Confinement:
        """The attempt's confinement, in the cgroup of a parked child when one is ready
        (that child then serves it: :meth:`launch`), else in a new cgroup."""
        sandboxed = attempt.isolation is Isolation.SANDBOX
        # A child parked for sandboxes made ahead the view of one without GPUs (DEFAULT_VIEW).
        gpus = sandboxed and attempt.assignment.get("gpus")
        parked = None if gpus else self.parked_children.take(sandboxed=sandboxed)
        if parked is not None and parked.cgroup is not None:
            try:
                return self.confiner.prepare(attempt, name=name, parked=parked)
            except CgroupError as exc:  # its cgroup would not take these limits: a new one will
                self.log.debug("parked_cgroup_refused", pid=parked.pid, error=str(exc))
                self.parked_children.drop(parked)  # its cgroup's removal takes the child with it
        return self.confiner.prepare(attempt, name=name)

    def check_open(self) -> None:
        if self.closed or not self.zygote.alive:
            raise IsolationError("the supervisor is shut down: start a new run")

    def next_request_id(self) -> int:
        return next(self._ids)

    def scope(self, attempt: Attempt) -> ContextScope | None:
        """The context keys ``attempt`` may see (None: all); its context is narrowed to them.

        The snapshot holds only the keys in the state's scope (none, for a sandbox without
        context_keys), and writes outside it are refused here, whatever the child does.
        """
        scope = scope_for(attempt.isolation, None)
        if isinstance(attempt.context, ScopedContext):
            scope = attempt.context.scope
        elif scope is not None:
            attempt.context = ScopedContext.over(attempt.context, scope)
        return scope

    def child_spec(
        self, secret: bytes, confinement: Confinement, scope: ContextScope | None,
        *, sandboxed: bool = False, **extra: Any,
    ) -> dict[str, Any]:
        """What a forked child reads first (through a memfd): where to connect, how to confine
        itself (its log comes with it: the first descriptor :meth:`start` sends it)."""
        confine = confinement.child_spec
        # The program's environment as it is now, not as it was when the zygote started (a
        # sandbox keeps only its few variables).
        changes = self.zygote.environment_changes(ENV_KEEP if sandboxed else None)
        if changes:
            confine = {**confine, "env": {**confine.get("env", {}), **changes}}
        return {
            "endpoint": self.router.endpoint,
            "secret": secret,
            "confine": confine,
            "sys_path": list(sys.path),
            # A sandbox gets the program's name only: arguments may carry secrets.
            "argv": list(sys.argv[:1] if sandboxed else sys.argv),
            "main": main_module.describe(),
            "context_keys": None if scope is None else list(scope.patterns),
            "cwd": os.getcwd(),
            "max_frame": self.config.max_frame,
            "receive_hwm": RECEIVE_HWM,
            **extra,
        }

    def start(
        self, child: Any, spec: dict[str, Any], output: Any, *, sandboxed: bool = False, fds: tuple[int, ...] = (),
    ) -> None:
        """Register ``child`` (a state child or a worker) and queue its fork; its ``output``
        pipe's write end goes to it, then ``fds``."""
        self._outputs[child.request_id] = output
        self._by_secret[child.secret] = child
        self._by_request[child.request_id] = child
        self._queued[child.request_id] = (spec, sandboxed, (output.child_fd, *fds))
        self._started += 1
        self._pump()

    def _pump(self) -> None:
        """Send queued fork requests while fewer than ``max_launching`` children start up.

        Children that are starting compete for the same cores, so a burst (a fan-out) gets
        through sooner a batch at a time than all at once; batches of about 8 per core
        let the zygote fork several back to back (fewer of its own pages copied per fork)
        while keeping the run queue short. ``AGENT_MAX_LAUNCHING`` overrides it.
        """
        while self._queued and len(self._launching) < self.config.max_launching and self.zygote.alive:
            request_id, (spec, sandboxed, fds) = next(iter(self._queued.items()))
            del self._queued[request_id]
            self._launching.add(request_id)
            try:
                if not self._hand_over(request_id, spec, sandboxed, fds):
                    self.zygote.spawn(request_id, spec, sandbox=sandboxed, fds=fds)
            except ConnectionError:
                return  # the zygote is gone: every child is failed by _on_zygote_lost
            except OSError as exc:  # its spec could not be written: no memory, or no descriptor left
                child = self._by_request.pop(request_id, None)
                if child is not None:
                    self.log.error("fork_failed", error=str(exc))
                    child.on_spawn_failed(f"its spec could not be written ({exc})")

    def _hand_over(self, request_id: int, spec: dict[str, Any], sandboxed: bool, fds: tuple[int, ...]) -> bool:
        """Hand the spec to the parked child in the launch's cgroup, if any; False when there
        is none or it is gone (a new child is then forked, which joins that cgroup)."""
        pid = spec["confine"].get("joined")
        if pid is None:
            return False
        sock = self.parked_children.take_socket(pid)
        charged = None
        if sock is not None:
            try:
                charged = self.zygote.hand_over(spec, sock, pid, sandbox=sandboxed, fds=fds)
            finally:
                sock.close()
        if charged is None:
            del spec["confine"]["joined"]
            return False
        self._untold[request_id] = (pid, sandboxed)
        self.parked.discard(pid)
        self._spawned(request_id, pid, list(charged))
        return True

    def _spawned(self, request_id: int, pid: int, charged: list[float] | None) -> None:
        """The child of ``request_id`` is process ``pid`` (forked, or a parked child handed its spec)."""
        output = self._outputs.get(request_id)
        if output is not None:
            output.child_started()
        child = self._by_request.pop(request_id, None)
        if child is not None:
            self._by_pid[pid] = child
            child.on_spawned(pid, charged)

    def launched(self, child: ChildProcess) -> None:
        """``child`` is up (or gone): let the next one start.

        A parked child handed its spec is now reported to the zygote as taken, which forks
        its replacement. Told at the hand-over, the zygote woke on the supervisor's core and
        took it over for the fork (0.3 ms), while the launched child, queued on that core
        too, waited; now the fork overlaps the state instead of delaying its start.
        """
        untold = self._untold.pop(child.request_id, None)
        if untold is not None:
            try:
                self.zygote.taken(*untold)
            except ConnectionError:
                pass  # the zygote is gone: every child is failed by _on_zygote_lost
        if child.request_id in self._launching:
            self._launching.discard(child.request_id)
            self._pump()

    def unqueue(self, child: ChildProcess) -> bool:
        """Drop a child whose fork was not requested yet; True when it was still queued."""
        return self._queued.pop(child.request_id, None) is not None

    def run_frame(self, attempt: Attempt) -> bytes:
        """The ``run`` message for ``attempt``: its function and context snapshot."""
        try:
            function = self.pickled.dumps(attempt.func)
        except Exception as exc:
            raise UnsendableStateError(unsendable(attempt.state_name, attempt.func, exc)) from exc
        context, classes = encode_snapshot(attempt.context, attempt.state_name, self.bounds)
        budget = attempt.context.budget
        failures = attempt.context.failed_states()
        if attempt.isolation is Isolation.SANDBOX:  # why another state failed may quote its secrets
            failures = dict.fromkeys(failures, HIDDEN_FAILURE)
        frame = encode_message(Run(
            run_id=attempt.run_id, agent_name=attempt.agent_name, state_name=attempt.state_name,
            attempt=attempt.number, function=function, context=context,
            classes=dumps(tuple(classes)) if classes else _NO_CLASSES,
            max_frame=self.config.max_frame, context_budget=budget.limit, context_bytes=budget.used,
            failures=failures,
        ))
        if len(frame) > self.config.max_frame:
            held = sum(len(k) + len(v) for k, v in context.items())
            why = (
                f"the context takes {held:,} bytes, over its budget of {budget.limit:,}: remove keys "
                "no longer needed, or raise the agent's context_budget_mb"
                if held > budget.limit else
                f"its function takes {len(function):,} bytes: keep large data out of the function "
                "(in files or the context)"
            )
            raise IsolationError(
                f"state {attempt.state_name!r}: its start message takes {len(frame):,} bytes, over the "
                f"{self.config.max_frame:,}-byte frame cap: {why}"
            )
        return frame

    async def until_ready(self, timeout: float | None = None) -> None:
        """Wait until the zygote is warmed up and can fork (a cold start takes a few tenths
        of a second), the supervisor shut down, or ``timeout`` seconds passed."""
        if self.ready or self.closed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._awaiting_ready.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in self._awaiting_ready:
                self._awaiting_ready.remove(waiter)

    def _now_ready(self) -> None:
        self.ready = True
        waiters, self._awaiting_ready = self._awaiting_ready, []
        for waiter in waiters:
            grant_soon(waiter)  # on its loop (a shutdown may come from another thread)

    def enter_attempt(self) -> None:
        """An executor starts using this supervisor's confiner for one attempt."""
        self._active += 1

    def exit_attempt(self) -> None:
        """That attempt closed its confinement; a shut-down supervisor releases the confiner."""
        self._active -= 1
        if self.closed and not self._active:
            self.confiner.close()

    def forget(self, child: ChildProcess) -> None:
        self._queued.pop(child.request_id, None)
        output = self._outputs.pop(child.request_id, None)
        if output is not None:  # before the outcome is judged: the log is then complete
            output.close_into(self.logs, getattr(child, "reported_at", None))
        self.launched(child)
        self._by_secret.pop(child.secret, None)
        if child.route is not None and self._by_route.get(child.route) is child:
            del self._by_route[child.route]
        self._by_request.pop(child.request_id, None)
        if child.request_id in self._state_children:
            self._state_children.discard(child.request_id)
            self._make_room()
        if child.pid is not None and self._by_pid.get(child.pid) is child:
            del self._by_pid[child.pid]
        if child.fd is not None and self._by_fd.get(child.fd) is child:
            del self._by_fd[child.fd]
        for pending in getattr(child, "pending", ()):
            self.unbind(child, pending.route, pending.fd)

    def bind(self, child: ChildProcess, route: bytes, fd: int) -> None:
        """From now on, frames from ``child`` come under ``route`` on ``fd``, and only there."""
        self._by_route[route] = child
        self._by_fd[fd] = child

    def unbind(self, child: ChildProcess, route: bytes, fd: int, dropped: int = 0) -> None:
        """Frames under ``route`` on ``fd`` are no longer ``child``'s (``dropped``: held ones lost)."""
        if self._by_route.get(route) is child:
            del self._by_route[route]
        if self._by_fd.get(fd) is child:
            del self._by_fd[fd]
        self._dropped += dropped

    def deliver(self, route: bytes, frames: list[bytes | memoryview], fd: int) -> None:
        """Handle frames held while their connection's hello waited for the fork report."""
        self._on_frame(route, frames, fd)

    @property
    def decoder(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that decodes big frames, so the loop keeps serving the other children."""
        if self._decoder is None:
            self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent-decode")
        return self._decoder

    def catch_up(self) -> None:
        """Read now what the zygote and the children have sent (forks, hellos, writes), as
        the event loop would have next."""
        if self.zygote.alive:
            self.zygote.read_reports()
        self.router.drain()

    def kill_pid(self, pid: int) -> None:
        try:
            self.zygote.kill(pid)
        except ConnectionError:
            pass  # the zygote is gone and its children with it

    def count_violation(self, child: Any, kind: str, message: str) -> None:
        """Count a protocol violation or a bound passed (``kind`` "bound") by ``child`` (a state
        child, an attempt on a worker, or a worker between attempts)."""
        if kind == "bound":
            self._bounds_exceeded += 1
        else:
            self._violations += 1
        attempt = child.attempt  # None for a worker between attempts
        self.log.warning("bound_exceeded" if kind == "bound" else "protocol_violation", pid=child.pid,
                         state=attempt and attempt.state_name, run_id=attempt and attempt.run_id,
                         message=message)

    def statistics(self) -> SupervisorStatistics:
        workers = self.workers.statistics()
        return SupervisorStatistics(
            zygote_pid=self.zygote.pid if self.zygote.alive else None,
            children_started=self._started,
            children_running=len(self._by_secret) - workers.idle - workers.starting,
            frames_dropped=self._dropped,
            protocol_violations=self._violations,
            bounds_exceeded=self._bounds_exceeded,
            workers=workers.live,
            workers_idle=workers.idle,
            parked=len(self.parked),
        )

    def attempts_cpu(self) -> list[tuple[str, str, int, float]]:
        """(run id, state, attempt number, CPU seconds so far) of each attempt in a state
        process or on a worker that has not reported yet, read from its cgroup now: what its
        ``usage()["cpu_seconds"]`` would say, without touching the attempt. Read-only; an
        attempt whose cgroup cannot be read is left out. Call it from this supervisor's loop."""
        out: list[tuple[str, str, int, float]] = []
        for host in list(self._by_secret.values()):
            child = host if isinstance(host, ChildProcess) else getattr(host, "attempt", None)
            if not isinstance(child, ChildProcess):  # a worker serving nothing
                continue
            if child.status not in (ChildStatus.LAUNCHING, ChildStatus.RUNNING):
                continue
            confinement = child.confinement
            handle = confinement.handle
            if handle is None:
                continue
            try:
                cpu = handle.cpu_seconds() - confinement.counted_before()
            except Exception:  # its cgroup is going away: its end reports its usage
                continue
            attempt = child.attempt
            out.append((attempt.run_id, attempt.state_name, attempt.number, max(0.0, cpu)))
        return out

    def kill_all(self) -> None:
        """SIGKILL every process running an attempt, now (``agent run`` stopped at once: the
        stop grace a state that ignores SIGTERM would get is not waited for)."""
        for host in list(self._by_secret.values()):
            child = host if isinstance(host, ChildProcess) else getattr(host, "attempt", None)
            if isinstance(child, ChildProcess) and child.status in (ChildStatus.LAUNCHING, ChildStatus.RUNNING):
                host.kill()

    # --- events ---------------------------------------------------------------------------

    def _on_frame(self, routing_id: bytes, frames: list[bytes | memoryview], fd: int) -> None:
        child = self._by_route.get(routing_id)
        if child is None:
            self._on_stranger(routing_id, frames, fd)
            return
        if routing_id != child.route:  # its hello waits for the zygote's report of the fork
            child.hold(routing_id, frames)
            return
        if fd != child.fd:  # cannot happen with routing ids libzmq gives: never trust it anyway
            self._dropped += 1
            self.blame(fd, f"a frame for {child.describe()} arrived on another connection")
            return
        if len(frames) != 1:
            self._dropped += 1
            child.violate(f"a message of {len(frames)} frames (one expected)")
            return
        child.receive(frames[0])

    def _on_stranger(self, routing_id: bytes, frames: list[bytes | memoryview], fd: int) -> None:
        """A frame on a connection bound to no attempt: it must be a true hello."""
        creds = peer_credentials(fd)
        hello = None
        if len(frames) == 1 and len(frames[0]) <= _HELLO_BYTES:
            try:
                hello = decode_message(frames[0], self.bounds, _HELLO)
            except ProtocolError:
                pass
        child = self._by_secret.get(hello.secret) if isinstance(hello, Hello) else None
        pid = creds[0] if creds is not None else 0  # 0: the connection is closed, its process unknown
        if child is None:
            self._dropped += 1
            self.blame(fd, "a frame came from this state's process on a connection that never said a "
                           "valid hello", pid)
            return
        if child.status is not ChildStatus.LAUNCHING or (creds is not None and creds[1] != self._uid) or (
            child.pid is not None and not sent_by(child.pid, pid)
        ):
            # Another process presents this child's secret: the sender is killed, the child untouched.
            self._dropped += 1
            self.blame(fd, f"this state's process sent a hello with the identity of {child.describe()}", pid)
            return
        child.on_hello(routing_id, fd, pid)  # type: ignore[arg-type]

    def blame(self, fd: int, message: str, peer_pid: int | None = None) -> None:
        """Kill the attempt whose process (or a process it started) opened connection ``fd``."""
        if peer_pid is None:
            creds = peer_credentials(fd)
            peer_pid = creds[0] if creds is not None else None
        owner = self._owner_of(peer_pid)
        self.log.warning("frame_dropped", why=message, fd=fd, peer_pid=peer_pid,
                         owner_pid=owner.pid if owner else None)
        if owner is not None:
            owner.violate(message)

    def _owner_of(self, pid: int | None) -> ChildProcess | None:
        """The child whose process is ``pid`` or one of its ancestors."""
        if not pid:  # unknown, or gone
            return None
        if pid in self._by_pid:
            return self._by_pid[pid]
        try:
            for parent in psutil.Process(pid).parents():
                if parent.pid in self._by_pid:
                    return self._by_pid[parent.pid]
        except psutil.Error:
            pass
        return None

    def _on_disconnect(self, fd: int) -> None:
        child = self._by_fd.pop(fd, None)
        if child is None:
            return
        loop = self.router.loop
        # Frames the child sent before closing may still be queued: judge after they are read.
        if loop is not None:
            loop.call_soon(child.on_disconnect)

    def _on_report(self, report: dict[str, Any]) -> None:
        op = report.get("op")
        if op == "spawned":
            self._spawned(report["id"], report["pid"], report.get("charged"))
        elif op == "ready":
            self._now_ready()
        elif op == "exited":
            self.parked.discard(report["pid"])
            self.parked_children.gone(report["pid"])
            child = self._by_pid.pop(report["pid"], None)
            if child is not None:
                child.on_exit(report["status"], report.get("cpu"), report.get("faults"))
        elif op == "parked":
            sock = report.get("socket")
            if sock is None:  # it could never be handed a spec
                self.zygote.kill(report["pid"])
                return
            self.parked.add(report["pid"])
            self.parked_children.parked(report["pid"], bool(report.get("sandbox")), sock)
        elif op == "let_go":
            self.parked_children.let_go(list(report["pids"]))
        elif op == "denied":
            child = self._by_pid.get(report["pid"])
            if child is not None:
                child.on_denied(str(report.get("call")))
        elif op == "spawn_failed":
            child = self._by_request.pop(report["id"], None)
            if child is not None:
                self.log.error("fork_failed", error=report.get("error"))
                child.on_spawn_failed(str(report.get("error")))

    def _on_zygote_lost(self) -> None:
        self.log.error("zygote_lost", zygote_pid=self.zygote.pid)
        self._fail_all(None)
        self.shutdown()

    def _fail_all(self, status: int | None, *, keep_idle: bool = False) -> None:
        for child in list(self._by_secret.values()):
            if keep_idle and getattr(child, "idle", False):
                continue  # an idle worker serves on from the next loop
            child.on_exit(status)
            self.forget(child)

    # --- shutdown ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the zygote (and so every child), close the channel, remove the files."""
        if self.closed:
            return
        self.closed = True
        self._make_room()  # those waiting for room are told it is shut down
        self._now_ready()  # and those waiting for its zygote: their attempts will say why
        self.workers.close()
        self.parked_children.close()
        self.zygote.close()
        children = list(self._by_secret.values())
        for child in children:
            self.forget(child)
            if child.status is not ChildStatus.EXITED:
                try:
                    child.confinement.kill()
                except (CgroupError, OSError):
                    pass  # its cgroup is gone already: the confiner closed first (at exit)
        for child in children:  # their attempts end now: no exit of theirs will be reported
            try:
                child.on_shutdown()
            except RuntimeError:  # its event loop is closed (at the program's exit): nobody waits
                pass
        self.router.close()
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
        if not self._active:  # else the last attempt to finish closes it (its cgroups are in use)
            self.confiner.close()
        deactivate(self.logs)
        self.logs.remove()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
        self.log.info("supervisor_stopped")


_NO_CLASSES = dumps(())
HIDDEN_FAILURE = "failed (a sandbox is not told why)"
"""What a sandboxed state's ``context.failed_states()`` says of each state that failed."""
_HELLO = frozenset({Hello})
_HELLO_BYTES = 256


_lock = threading.Lock()
_current: Supervisor | None = None
_others: list[Supervisor] = []  # for event loops that ran isolated states while _current served another
_inherited: list[Supervisor] = []


def _forget_after_fork() -> None:
    """In a process forked from this one (``multiprocessing``'s default on Linux), the
    supervisor is the parent's: its zygote, sockets and threads serve the parent. The
    child starts its own on first use; the parent's stays referenced, never used nor
    closed (closing its ZeroMQ sockets from a fork could hang, or take them from the parent);
    only its copies of the parked children's sockets are closed."""
    global _current, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    if _current is not None:
        _inherited.append(_current)
        _current = None
    _inherited.extend(_others)
    _others.clear()
    for sup in _inherited:
        sup.parked_children.forget_after_fork()


os.register_at_fork(after_in_child=_forget_after_fork)


def get_supervisor() -> Supervisor:
    """The process's supervisor, started on first use and after its zygote died."""
    global _current
    with _lock:
        if _current is None or _current.closed:
            _current = Supervisor()
        return _current


def serving_supervisor(loop: asyncio.AbstractEventLoop) -> Supervisor:
    """A supervisor serving ``loop``, with one attempt counted on it (end it with
    :meth:`Supervisor.exit_attempt`).

    The process's own one, unless an event loop of another thread that still runs uses
    it (runs on several threads at once: ``run_sync`` in a thread pool, a threaded web
    server); then one that serves no running loop, else a new one, with a zygote of its
    own. Each lasts until the process ends, reused by whichever loop needs one.
    """
    global _current
    with _lock:
        if _current is None or _current.closed:
            _current = Supervisor()
        _others[:] = [sup for sup in _others if not sup.closed]
        candidates = [_current, *_others]
        sup = next((c for c in candidates if c.router.loop is loop), None)
        if sup is None:
            sup = next((c for c in candidates if c.free_for(loop)), None)
        if sup is None:
            sup = Supervisor()
            _others.append(sup)
        sup.attach(loop)
        sup.enter_attempt()
        return sup


def current_supervisor() -> Supervisor | None:
    """The running supervisor, if any (starts nothing)."""
    return _current if _current is not None and not _current.closed else None


def running_attempts_cpu() -> list[tuple[str, str, int, float]]:
    """:meth:`Supervisor.attempts_cpu` of every supervisor serving the calling thread's
    running event loop (none outside one): what the monitor samples once per update."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return []
    out: list[tuple[str, str, int, float]] = []
    for sup in (_current, *_others):
        if sup is not None and not sup.closed and sup.router.loop is loop:
            out.extend(sup.attempts_cpu())
    return out


def shutdown_supervisor() -> None:
    """Tear down the process's supervisors (one starts again on the next isolated attempt)."""
    global _current
    with _lock:
        sups = [sup for sup in (_current, *_others) if sup is not None]
        _current = None
        _others.clear()
    for sup in sups:
        _shut_down_where_it_serves(sup)


_SHUTDOWN_WAIT = 1.0
"""Seconds a supervisor serving another thread's running loop is given to shut down there."""


def _shut_down_where_it_serves(sup: Supervisor) -> None:
    """Shut ``sup`` down on the loop it serves when another thread runs that loop (the
    program exits while a thread's ``run_sync()`` goes on): there its state changes only
    on that loop, and a run it serves is told the supervisor shut down. Here otherwise."""
    try:
        call_on(sup.router.loop, sup.shutdown, _SHUTDOWN_WAIT)
    except (TimeoutError, RuntimeError):  # that loop is blocked, or it closed meanwhile
        sup.shutdown()


at_exit(shutdown_supervisor)
