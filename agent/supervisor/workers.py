"""The ``worker`` isolation level: reused worker processes, each confined to one resource shape.

A worker is a state process that the zygote forked once and that serves attempts one
after the other (:mod:`agent.runtime.worker`), in a cgroup of its own sized to its
*shape*: the kernel limits its attempts get (CPU quota, memory, IO, pids, devices), the
GPUs it was pinned to, the context keys it may see, and the working directory, import
path and ``argv`` of the program. An attempt only ever runs on a worker of its own
shape, so it gets exactly the limits it asked for, enforced by the kernel on the whole
worker; workers serve the states of this one supervisor, so of one user's process.

Which worker, and when a new one starts (:class:`WorkerPool`):

* an attempt takes an idle worker of its shape, the most recently used first (so the
  others idle out), else it waits for one;
* a worker is started for waiting attempts when none of their shape exists, or when the
  attempt that has waited longest has waited as long as a worker takes to start
  (measured): short states are served by the few workers that free up fast enough,
  states that hold their worker long (an LLM call) get a worker each, up to the cap;
* at most ``AGENT_WORKER_MAX`` workers live at once (default 64); past it an idle
  worker of another shape is retired to make room, else the attempt waits.

When a worker goes (with its cgroup, leaving no process behind):

* after ``AGENT_WORKER_MAX_STATES`` attempts (default 1000) or once it is
  ``AGENT_WORKER_MAX_AGE`` seconds old (default 3600), when its attempt ends;
* when it was idle for ``AGENT_WORKER_IDLE`` seconds (default 10): it exits by itself;
* when a state left processes running in its cgroup, or threads or tasks that will not
  end, or did not stop within ``AGENT_STOP_GRACE`` of a timeout, cancel or preemption;
* when it dies: a limit hit (the attempt fails with the kernel's reason, as a process
  would), a crash, a protocol violation. Its attempt is then judged exactly as a state
  child's would be, and retried by the run's policy; the next attempt gets a new worker.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import secrets
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import _env
from .._loops import outside_caller
from ..errors import FailureReason, IsolationError
from ..executor import Attempt, AttemptFailed
from ..scope import ContextScope
from .cgroups import CgroupLimits
from .confinement import counts_unpinned_gpus, removed
from .output import WorkerOutput
from .worker import WorkerAttempt, WorkerProcess, WorkerStatus

if TYPE_CHECKING:
    from .service import Supervisor

_EWMA = 0.2  # weight of the newest sample in the measured start time


async def _gone_with_its_cgroup(worker: WorkerProcess) -> None:
    await worker.until_gone()
    await removed(worker.confinement)


@dataclass(frozen=True)
class WorkerSettings:
    """How many workers live and for how long (defaults from the environment)."""

    max_workers: int = field(default_factory=lambda: _env.count("AGENT_WORKER_MAX", 64, least=1))
    max_states: int = field(default_factory=lambda: _env.count("AGENT_WORKER_MAX_STATES", 1000, least=1))
    max_age: float = field(default_factory=lambda: _env.seconds("AGENT_WORKER_MAX_AGE", 3600.0, above_zero=True))
    idle: float = field(default_factory=lambda: _env.seconds("AGENT_WORKER_IDLE", 10.0, above_zero=True))


@dataclass(frozen=True)
class Shape:
    """What a worker is made for: attempts with equal shapes may share it."""

    limits: CgroupLimits
    gpus: tuple[str, ...]
    unpinned_gpus: bool  # GPU units counted, not pinned: it sees the program's GPUs (counts_unpinned_gpus)
    context_keys: tuple[str, ...] | None
    cwd: str
    sys_path: tuple[str, ...]
    argv: tuple[str, ...]
    environ: tuple[tuple[str, str | None], ...]  # what the program's environment changed since its zygote started


@dataclass(frozen=True)
class WorkerStatistics:
    """A snapshot of the workers of one supervisor."""

    live: int
    idle: int
    busy: int
    starting: int
    waiting: int
    started: int
    retired: int


class _Waiting:
    __slots__ = ("attempt", "run_frame", "future", "since", "caller")

    def __init__(self, attempt: Attempt, run_frame: bytes, future: asyncio.Future[WorkerAttempt]) -> None:
        self.attempt = attempt
        self.run_frame = run_frame
        self.future = future
        self.since = time.monotonic()
        self.caller = contextvars.copy_context()  # the attempt's task's: see ChildProcess


class _Queue:
    """The workers of one shape and the attempts waiting for one."""

    def __init__(self, shape: Shape, scope: ContextScope | None) -> None:
        self.shape = shape
        self.scope = scope
        self.idle: list[WorkerProcess] = []  # most recently used last
        self.busy: set[WorkerProcess] = set()
        self.starting: set[WorkerProcess] = set()
        self.waiting: deque[_Waiting] = deque()
        self.timer: asyncio.TimerHandle | None = None  # the next look at the longest wait
        self.last_start = 0.0


def _ewma(old: float, sample: float) -> float:
    return old + _EWMA * (sample - old)


class WorkerPool:
    """The supervisor's workers, by shape: hands them out, starts and retires them."""

    def __init__(self, supervisor: "Supervisor", settings: WorkerSettings | None = None) -> None:
        self.supervisor = supervisor
        self._settings = settings
        self._queues: dict[Shape, _Queue] = {}
        self._live: set[WorkerProcess] = set()
        self._start_time = 0.005  # seconds from a worker's fork request to its hello (measured)
        self._started = 0
        self._retired = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def settings(self) -> WorkerSettings:
        if self._settings is None:
            self._settings = WorkerSettings()
        return self._settings

    @property
    def max_workers(self) -> int:
        """Live workers at most: ``AGENT_WORKER_MAX``, or fewer where the open-files limit
        leaves room for fewer (:mod:`.descriptors`)."""
        return min(self.settings.max_workers, self.supervisor.budget.workers)

    # --- attempts ------------------------------------------------------------------------

    def acquire(self, attempt: Attempt) -> asyncio.Future[WorkerAttempt]:
        """A future of ``attempt`` running on a worker of its shape (its ``run`` sent)."""
        sup = self.supervisor
        sup.check_open()
        scope = sup.scope(attempt)
        run_frame = sup.run_frame(attempt)
        shape = Shape(
            limits=sup.confiner.limits(attempt),
            gpus=tuple(str(u) for u in attempt.assignment.get("gpus", ())),
            unpinned_gpus=counts_unpinned_gpus(attempt),
            context_keys=None if scope is None else tuple(scope.patterns),
            cwd=os.getcwd(),
            sys_path=tuple(sys.path),
            argv=tuple(sys.argv),
            environ=tuple(sorted(sup.zygote.environment_changes().items())),
        )
        queue = self._queues.get(shape)
        if queue is None:
            queue = self._queues[shape] = _Queue(shape, scope)
        future: asyncio.Future[WorkerAttempt] = asyncio.get_running_loop().create_future()
        queue.waiting.append(_Waiting(attempt, run_frame, future))
        self._dispatch(queue)
        if queue.waiting:
            self._grow(queue)
        return future

    def _dispatch(self, queue: _Queue) -> None:
        """Give waiting attempts to idle workers."""
        while queue.waiting and queue.idle:
            waiting = queue.waiting.popleft()
            if waiting.future.done():  # cancelled while it waited
                continue
            worker = queue.idle.pop()
            try:
                child = worker.serve(waiting.attempt, waiting.run_frame, waiting.caller)
            except ConnectionError:  # it exited as it was handed out (idle): another takes it
                queue.waiting.appendleft(waiting)
                worker.kill()
                continue
            except BaseException as exc:  # e.g. the log could not be opened
                queue.idle.append(worker)
                waiting.future.set_exception(exc)
                continue
            queue.busy.add(worker)
            waiting.future.set_result(child)

    def _grow(self, queue: _Queue) -> None:
        """Start workers for waiting attempts while that makes them start sooner."""
        while queue.waiting and len(queue.starting) < len(queue.waiting) and self._worth_starting(queue):
            if not self._room(queue):
                return
            try:
                self._start(queue, queue.waiting[0].attempt)
            except BaseException as exc:  # the cgroup could not be made: fail the attempt, not the pool
                waiting = queue.waiting.popleft()
                if not waiting.future.done():
                    waiting.future.set_exception(exc)

    def _worth_starting(self, queue: _Queue) -> bool:
        """Start another worker when none serves the shape, or when the longest-waiting attempt
        has waited as long as a worker takes to start, and no worker started meanwhile
        (checked again then, by a timer): at most one start per start time while they wait."""
        if not queue.busy and not queue.starting:
            return True
        if len(queue.starting) >= self.supervisor.config.max_launching:
            return False
        now = time.monotonic()
        due = max(queue.waiting[0].since, queue.last_start) + self._start_time
        if now >= due:
            return True
        if queue.timer is None:
            queue.timer = asyncio.get_running_loop().call_later(
                due - now, self._check, queue, context=contextvars.Context())
        return False

    def _check(self, queue: _Queue) -> None:
        queue.timer = None
        if queue.waiting and self._queues.get(queue.shape) is queue:
            self._grow(queue)

    def _room(self, queue: _Queue) -> bool:
        """Whether one more worker may start; retires an idle one of another shape if that helps."""
        if len(self._live) < self.max_workers:
            return True
        others = [w for q in self._queues.values() if q is not queue for w in q.idle]
        if others:
            oldest = min(others, key=lambda w: w.idle_since)
            self._retire(oldest)
        return False

    def _start(self, queue: _Queue, attempt: Attempt) -> None:
        outside_caller(self._start_worker, queue, attempt)  # the worker outlives the attempt

    def _start_worker(self, queue: _Queue, attempt: Attempt) -> None:
        sup = self.supervisor
        confinement = sup.confine(attempt, name="worker")
        try:
            loop = asyncio.get_running_loop()
            output = WorkerOutput(loop)
            secret = secrets.token_bytes(16)  # said in its hellos; its own channel is what identifies it
            worker = WorkerProcess(self, queue.shape, confinement, secret, sup.next_request_id(), output, loop)
            spec = sup.child_spec(secret, confinement, queue.scope, worker={"idle": self.settings.idle})
        except BaseException:
            confinement.close()
            raise
        self._live.add(worker)
        queue.starting.add(worker)
        queue.last_start = time.monotonic()
        self._started += 1
        sup.start(worker, spec, output, fds=(worker.channel.child_end.fileno(),))  # type: ignore[union-attr]

    # --- what workers report -------------------------------------------------------------

    def worker_ready(self, worker: WorkerProcess, finished: WorkerAttempt | None) -> None:
        """``worker`` said hello: it started, or ``finished`` is over."""
        queue = self._queues[worker.shape]
        now = time.monotonic()
        if finished is None:
            queue.starting.discard(worker)
            self._start_time = _ewma(self._start_time, now - worker.requested_at)
        else:
            queue.busy.discard(worker)
        worker.idle_since = now
        # A worker that served GPUs goes too: the GPU memory it allocated (a CUDA context)
        # stays with the process, and the GPUs go to other states once it has exited.
        spoilt = finished is not None and (
            finished.escaped is not None or finished.hit_limit or bool(worker.shape.gpus)
            or worker.shape.unpinned_gpus)
        if spoilt or self._worn_out(worker, now):
            self._retire(worker)
            if finished is not None and finished.attempt.settle is not None:
                from .process import settle_later  # (process imports the supervisor, which imports this)

                # Its run returns once the worker and its cgroup are gone, as a process child's does.
                settle_later(finished.attempt, _gone_with_its_cgroup(worker))
        else:
            queue.idle.append(worker)
            self._dispatch(queue)
        if queue.waiting:
            self._grow(queue)
        elif len(self._live) >= self.max_workers and worker.status is WorkerStatus.IDLE:
            self._make_room_for_others(queue)

    def _worn_out(self, worker: WorkerProcess, now: float) -> bool:
        settings = self.settings
        if self._closed or worker.served >= settings.max_states:
            return True
        if worker.served and now - worker.requested_at >= settings.max_age:
            return True  # (as an attempt ends: one younger than its start would serve none)
        handle = worker.confinement.handle
        if handle is None or worker.served == 0:
            return False
        changed = handle.limits_changed()
        if changed:  # the state rewrote its limits (as root): the next must not have them
            self.supervisor.log.warning("worker_limits_changed", worker=worker.pid, files=changed)
            return True
        # A state left processes: a lone task (one read) is the worker alone; else list them.
        tasks = handle.task_count()
        return (tasks is None or tasks > 1) and len(handle.pids()) > 1

    def _make_room_for_others(self, queue: _Queue) -> None:
        for other in self._queues.values():
            if other is not queue and other.waiting and not other.busy and not other.starting and queue.idle:
                self._retire(queue.idle[0])
                return

    def _retire(self, worker: WorkerProcess) -> None:
        queue = self._queues.get(worker.shape)
        if queue is not None and worker in queue.idle:
            queue.idle.remove(worker)
        self._retired += 1
        worker.kill()

    def worker_gone(self, worker: WorkerProcess) -> None:
        """``worker`` exited and was cleaned up (its cgroup removed)."""
        self._live.discard(worker)
        queue = self._queues.get(worker.shape)
        if queue is None:
            return
        never_ready = worker in queue.starting
        queue.starting.discard(worker)
        queue.busy.discard(worker)
        if worker in queue.idle:
            queue.idle.remove(worker)
        if never_ready and not worker.killed and queue.waiting:
            # It could not start: one waiting attempt fails, as a child that cannot start would.
            self._fail_one(queue, worker.start_failure())
        if not (queue.idle or queue.busy or queue.starting or queue.waiting):
            del self._queues[worker.shape]
        for other in list(self._queues.values()):
            if other.waiting:
                self._grow(other)

    def start_failed(self, worker: WorkerProcess, message: str) -> None:
        worker.failure_message = message

    def _fail_one(self, queue: _Queue, reason: FailureReason) -> None:
        while queue.waiting:
            waiting = queue.waiting.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(AttemptFailed(reason))
                return

    # --- the supervisor's life -------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The supervisor moved to ``loop``: read workers' output there; drop waiters of closed loops."""
        if loop is self._loop:
            return
        self._loop = loop
        for worker in self._live:
            worker.output.move_to(loop)
            worker.channel.move_to(loop)
        for queue in self._queues.values():
            queue.waiting = deque(w for w in queue.waiting if not w.future.get_loop().is_closed())
            if queue.timer is not None:  # the last loop's, which will never fire: look again here
                queue.timer.cancel()
                queue.timer = None

    def close(self) -> None:
        """The supervisor shuts down (its zygote takes every worker with it): fail who waits,
        close the files kept for each worker."""
        self._closed = True
        for worker in list(self._live):
            worker.close_files()
            worker.confinement.close_files()
        for queue in self._queues.values():
            while queue.waiting:
                waiting = queue.waiting.popleft()
                if not waiting.future.done() and not waiting.future.get_loop().is_closed():
                    waiting.future.set_exception(IsolationError("the supervisor shut down: start a new run"))

    def statistics(self) -> WorkerStatistics:
        queues = self._queues.values()
        return WorkerStatistics(
            live=len(self._live),
            idle=sum(len(q.idle) for q in queues),
            busy=sum(len(q.busy) for q in queues),
            starting=sum(len(q.starting) for q in queues),
            waiting=sum(len(q.waiting) for q in queues),
            started=self._started,
            retired=self._retired,
        )

    def idle_pids(self) -> set[int]:
        """Workers serving nothing now (they stay, warm, until idle for AGENT_WORKER_IDLE)."""
        return {w.pid for q in self._queues.values() for w in q.idle if w.pid is not None}

    def warm_pids(self) -> set[int]:
        """Workers serving no attempt: idle ones, and ones still starting (idle once up)."""
        starting = {w.pid for q in self._queues.values() for w in q.starting if w.pid is not None}
        return self.idle_pids() | starting
