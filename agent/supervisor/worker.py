"""One worker process as the supervisor sees it, and one attempt served by it.

A :class:`WorkerProcess` is registered with the supervisor like a state child (same
routing, same reports from the zygote) and has its own lifecycle::

    STARTING --hello--> IDLE --serve--> BUSY --hello--> IDLE ... --exit--> EXITED

Each attempt it serves is a :class:`WorkerAttempt`: the state child's protocol and
verdict (:class:`~agent.supervisor.child.ChildProcess`), hosted by the worker instead
of the supervisor, so that "the child" it kills is the worker, and "the attempt is over"
is the worker's next ``hello`` rather than its exit. What the attempt used is measured
on the worker's cgroup, read once as each attempt ends (:class:`SharedConfinement`); what
it printed goes to its own log (:class:`WorkerOutput`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import os
import time
from typing import TYPE_CHECKING, Any

from .._loops import grant_soon
from ..errors import FailureReason, IllegalTransitionError, ProtocolError
from ..executor import Attempt
from ..ipc import FROM_CHILD, Hello, decode_message, encode_message
from ..ipc.messages import decode_counted
from ..runtime.worker import EXIT_IDLE
from ..runtime.zygote import charged_in
from ..values import shortened
from .channel import DirectChannel
from .child import (
    MAX_VIOLATION_TEXT, ChildProcess, ChildStatus, _Decoded, cgroup_escape, escape_reason, exit_code_and_signal,
)
from .confinement import Confinement, Reading, SharedConfinement, restart_peak
from .output import WorkerOutput, label_for

if TYPE_CHECKING:
    from .service import Supervisor
    from .workers import Shape, WorkerPool


class WorkerStatus(enum.Enum):
    """Where a worker is in its life."""

    STARTING = "starting"  # fork requested, no hello yet
    IDLE = "idle"  # ready for an attempt
    BUSY = "busy"  # serving one
    EXITED = "exited"  # reaped by the zygote (or never forked)


_HELLO_BYTES = 256  # a hello is far smaller: anything bigger between attempts is refused undecoded

_ALLOWED = {
    WorkerStatus.STARTING: {WorkerStatus.IDLE, WorkerStatus.EXITED},
    WorkerStatus.IDLE: {WorkerStatus.BUSY, WorkerStatus.EXITED},
    WorkerStatus.BUSY: {WorkerStatus.IDLE, WorkerStatus.EXITED},
    WorkerStatus.EXITED: set(),
}


class WorkerAttempt(ChildProcess):
    """One attempt on a worker: a state child's protocol, with the worker as its host."""

    def __init__(
        self, worker: "WorkerProcess", attempt: Attempt, log_path: str, caller: contextvars.Context | None = None,
    ) -> None:
        self.shared = SharedConfinement(worker.confinement, worker.baseline)
        super().__init__(
            worker,  # type: ignore[arg-type]  # the host: see WorkerProcess's host methods
            attempt, self.shared, secret=worker.secret,
            request_id=worker.request_id, log_path=log_path, run_frame=None, bounds=worker.bounds, caller=caller,
        )
        self.worker = worker
        self.earlier = worker.served  # states the worker served before this one
        self.escaped: FailureReason | None = None  # judged at its end: see ended()
        self.hit_limit = False  # its memory or pids limit was hit (a subprocess of it killed, say)
        self._judged = False
        self.pid = worker.pid
        self.fd = worker.fd
        self.status = ChildStatus.RUNNING  # the worker said hello already
        self.began = time.monotonic()
        # Set with ``exited``, for the executor alone to await (and cancel): no shield, so
        # the executor resumes one turn of the event loop sooner.
        self.over: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def ended(self) -> None:
        """The worker said it is ready again: this attempt is over.

        What the kernel charged the worker so far is read now, to be held against what its
        cgroup saw (:meth:`_escape`): a state that moved the worker out of its cgroup is
        found at the end of its attempt, not only when the worker exits.
        """
        if self.pid is not None:
            cpu, faults = self.worker.charged_so_far()
            before_cpu, before_faults = self.worker.charged_before
            self._exit_cpu, self._exit_faults = max(0.0, cpu - before_cpu), max(0, faults - before_faults)
            # Judged now, before the worker serves again: one that left its cgroup is retired
            # (its limits no longer hold, and every later attempt would look like an escape).
            # On the attempt's own final figures: the cgroup is read once per attempt.
            self.shared.end()
            events = self.shared.limit_events()
            self.hit_limit = bool(events.oom_kills or events.pids_limit_hits)
            self.escaped, self._judged = self._escape({}) or self._moved_out(), True
        self.on_exit_status(0)

    def _finalize(self) -> None:
        try:
            super()._finalize()
        finally:
            if self.status is ChildStatus.EXITED and not self.over.done():
                try:
                    self.over.set_result(self._exit_status)
                except RuntimeError:  # its event loop is closed: nobody awaits it any more
                    pass

    def _failure(self, status: int | None) -> FailureReason:
        reason = super()._failure(status)
        earlier = self.earlier
        if reason.kind == "limit" and reason.details.get("limit") == "memory" and earlier:
            # Memory earlier states left in the worker counts against this one: not its own
            # failure for sure, so not permanent (a retry runs on a new worker).
            return dataclasses.replace(reason, message=(
                f"{reason.message}, on a worker that had served {earlier} earlier state(s), whose memory "
                "may count (use isolation='process' for states that keep memory)"),
                details={**reason.details, "retryable": True})
        return reason

    def on_exit_status(self, status: int | None) -> None:
        if self.status is not ChildStatus.EXITED and not self._exit_known:
            self._exit_known = True
            self._exit_status = status
            self._finalize()

    def _handle(self, frame: bytes | memoryview) -> None:
        hello = self.worker.hello
        if hello is not None and frame == hello[0]:  # its hello, byte for byte: known already
            self._apply(hello[1])
        else:
            super()._handle(frame)

    def _dispatch(self, decoded: _Decoded) -> None:
        if not isinstance(decoded.msg, Hello):
            super()._dispatch(decoded)
            return
        if self.status is ChildStatus.RUNNING and not self._stopping:
            # A worker reports (result or error) before it says ready, unless it was told to
            # stop: a hello before that would end the attempt while its state runs on.
            raise ProtocolError("a hello while its state ran, before the attempt reported")
        # Ready again: the attempt is over. Frames after it belong to no attempt.
        rest, self._inbox = list(self._inbox), type(self._inbox)()
        try:
            self.worker.ready()
        except Exception:
            self.worker.kill()  # the attempt's end could not be filed: the worker serves no other
            raise
        for frame in rest:
            self.worker.receive(frame)

    def _escape(self, usage: dict[str, Any]) -> FailureReason | None:
        """Whether the worker left its cgroup: its figures are its whole life's, as its cgroup's."""
        if self._judged:
            return self.escaped
        if not self._in_cgroup():
            return None
        owner = self.worker.confinement
        final = self.shared.final
        return escape_reason(owner, final[0] if final else owner.usage(), self._exit_cpu, self._exit_faults)

    def _moved_out(self) -> FailureReason | None:
        """Whether the worker is out of its cgroup in some hierarchy: a state that moved it and
        then did little is not seen in the figures, and the next state would run unconfined."""
        handle = self.worker.confinement.handle
        if handle is None or self.pid is None or handle.holds(self.pid):
            return None
        return cgroup_escape("its process is no longer in the worker's cgroup", {})

    @property
    def never_ran(self) -> bool:
        """The worker went away idle before it read this attempt: nothing of it ran."""
        return self._exit_known and _idle_exit(self._exit_status)


def _idle_exit(status: int | None) -> bool:
    return status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_IDLE


class WorkerProcess:
    """The supervisor's record of one worker process of one shape."""

    idle_statuses = (WorkerStatus.IDLE,)

    def __init__(self, pool: "WorkerPool", shape: "Shape", confinement: Confinement, secret: bytes,
                 request_id: int, output: WorkerOutput, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._sup: "Supervisor" = pool.supervisor
        self.shape = shape
        self.confinement = confinement
        self.secret = secret
        self.request_id = request_id
        self.output = output
        self.channel = DirectChannel(
            loop, max_frame=self._sup.config.max_frame, on_frame=self._on_frame,
            on_violation=self.violate, on_close=self.on_disconnect,
        )
        self.status = WorkerStatus.STARTING
        self.pid: int | None = None
        self.fd: int | None = None
        self.route: bytes | None = None  # the channel is its own: no route on the ROUTER
        self.attempt: WorkerAttempt | None = None
        self.served = 0
        self.requested_at = time.monotonic()
        self.ready_at: float | None = None
        self.idle_since = self.requested_at
        self.exit_status: int | None = None
        self._gone_waiters: list[asyncio.Future[None]] = []  # until_gone()
        self.failure_message: str | None = None
        self.killed = False  # by the supervisor: retired or replaced
        self.charged_before: tuple[float, int] = (0.0, 0)  # a parked child's warm-up, read at its hand-over
        # Its cgroup's figures when its last attempt ended (its peak restarted then): the
        # next attempt's starting point, so that each attempt reads the cgroup only once.
        self.baseline: Reading | None = None
        self._stat_fd: int | None = None  # its /proc/<pid>/stat, read as each attempt ends
        self.hello: tuple[bytes, _Decoded] | None = None  # the frame it says ready with, decoded
        self._hello_heard = False  # its first hello came before its pid
        self._cleaned = False
        self._limit_failure: FailureReason | None = None  # a limit its start hit (_start_limit)

    # --- as the supervisor sees it ----------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Serving nothing: the supervisor's loop may move, and its statistics leave it out."""
        return self.status is WorkerStatus.IDLE

    def _move(self, new: WorkerStatus) -> None:
        if new not in _ALLOWED[self.status]:
            raise IllegalTransitionError(f"worker {self.pid}: {self.status.value} -> {new.value}")
        self.status = new

    def on_spawned(self, pid: int, charged: list[float] | None = None) -> None:
        self.pid = pid
        if charged is not None:  # a parked child: what its warm-up took, left out of its figures
            self.charged_before = (float(charged[0]), int(charged[1]))
        self.channel.child_started()
        self.confinement.started(pid)
        handle = self.confinement.handle
        if handle is not None and handle.procs_files:
            try:
                self._sup.zygote.remove_on_idle_exit(pid, [os.path.dirname(f) for f in handle.procs_files])
            except ConnectionError:
                pass  # the zygote is gone, and the worker with it: its exit says so
        frame = encode_message(Hello(pid=pid, secret=self.secret))
        msg, objects = decode_counted(frame, self._sup.bounds, FROM_CHILD)
        self.hello = (frame, _Decoded(msg, objects=objects))
        try:
            self._stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # gone already: its exit report follows
        if self.killed:
            self._sup.kill_pid(pid)
        elif self._hello_heard and self.status is WorkerStatus.STARTING:
            self.ready()

    def charged_so_far(self) -> tuple[float, int]:
        """CPU seconds and page faults the kernel charged the worker so far (0s once it is gone).

        Its ``/proc/<pid>/stat`` stays open for its life: one ``pread`` per attempt, and a
        descriptor that never reads another process that got its pid.
        """
        if self._stat_fd is None:
            return 0.0, 0
        try:
            return charged_in(os.pread(self._stat_fd, 4096, 0))
        except OSError:
            return 0.0, 0

    def on_spawn_failed(self, error: str) -> None:
        self._pool.start_failed(self, f"the worker's process could not be started: {error}")
        self.on_exit(None)

    def on_denied(self, call: str) -> None:
        return None  # workers are never sandboxed

    def _on_frame(self, data: bytes) -> None:
        self.receive(data)

    def receive(self, frame: bytes | memoryview) -> None:
        """A frame from the worker: its attempt's (bounded as a state child's are), else a hello."""
        if self.attempt is not None:
            self.attempt.receive(frame)
            return
        if len(frame) > _HELLO_BYTES:
            self.violate(f"a {len(frame):,}-byte frame while it serves no attempt (a hello was expected)")
            return
        try:
            msg = decode_message(frame, self._sup.bounds, FROM_CHILD)
        except ProtocolError as exc:
            self.violate(str(exc))
            return
        if isinstance(msg, Hello) and self.status is WorkerStatus.STARTING:
            if self.pid is None:
                # Up before the zygote said which process it is: ready once it has (an
                # attempt on a worker of unknown pid could be neither watched nor killed).
                self._hello_heard = True
            else:
                self.ready()
        else:
            self.violate(f"a {msg.TYPE} message while it serves no attempt")

    def on_disconnect(self) -> None:
        if self.attempt is not None:
            self.attempt.on_disconnect()

    def on_shutdown(self) -> None:
        """The supervisor shut down: the attempt it serves, if any, ends now, saying so."""
        if self.attempt is not None:
            self.attempt._shut_down = True
        self.on_exit(None)

    def on_exit(self, status: int | None, cpu: float | None = None, faults: int | None = None) -> None:
        """The zygote reaped the worker (None: the zygote is gone, or it never forked), which
        the kernel charged ``cpu`` seconds and ``faults`` page faults in its life."""
        if self.status is WorkerStatus.EXITED:
            return
        self._move(WorkerStatus.EXITED)
        waiters, self._gone_waiters = self._gone_waiters, []
        for waiter in waiters:
            grant_soon(waiter)
        before_cpu, before_faults = self.charged_before  # a parked child's warm-up
        cpu = None if cpu is None else max(0.0, cpu - before_cpu)
        faults = None if faults is None else max(0, faults - before_faults)
        # The zygote removes the cgroup of a worker that idled out (its figures went with it).
        removed = _idle_exit(status) and self.confinement.cgroup_gone()
        if status is not None and not removed:
            self.confinement.usage()  # its cgroup's final figures, kept for the attempt's verdict
        self.exit_status = status
        # Its cgroup is then removed off the loop, unless the worker left processes there
        # (why it exited): they are killed before its attempt is over.
        self.confinement.reaped = status is not None and not self._others_left()
        if status is None and self.pid is not None and not self._sup.closed:
            self._sup.kill_pid(self.pid)  # lost track of it: make sure it is gone
        attempt = self.attempt
        if attempt is None:
            self._cleanup()
        elif attempt.status is ChildStatus.REPORTED or _idle_exit(status):
            # It reported, then the worker went: the report stands. Or it went idle before
            # reading the attempt: nothing ran, another worker takes it.
            attempt.on_exit_status(status)
        else:
            attempt.on_exit(status, cpu, faults)  # judged like a child's exit; cleaned up when it is over
        if attempt is None and status is not None and not removed:
            escape = escape_reason(self.confinement, self.confinement.usage(), cpu, faults)
            if escape is not None:  # between attempts: nobody to fail, but it is said
                self._sup.log.warning("worker_left_its_cgroup", pid=self.pid, message=escape.message)

    async def until_gone(self) -> None:
        """Wait until the worker has exited (it was retired or killed)."""
        if self.status is WorkerStatus.EXITED:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gone_waiters.append(waiter)
        await waiter

    def _others_left(self) -> bool:
        """Whether processes are left in its cgroup now that the worker is reaped."""
        handle = self.confinement.handle
        if handle is None:
            return False
        try:
            return bool(handle.pids())
        except OSError:
            return True

    def violate(self, message: str, *, kind: str = "protocol", traceback: str = "") -> None:
        """A protocol violation (or a bound passed): its attempt's if it serves one; the worker goes."""
        if self.attempt is not None:
            self.attempt.violate(message, kind=kind, traceback=traceback)
        else:
            self._sup.count_violation(self, kind, shortened(message, MAX_VIOLATION_TEXT))
            self.kill()

    def kill(self) -> None:
        """SIGKILL the worker through the zygote (retired, or replaced)."""
        if self.status is WorkerStatus.EXITED:
            return
        self.killed = True
        if self.pid is not None:
            self._sup.kill_pid(self.pid)
        elif self._sup.unqueue(self):  # type: ignore[arg-type]
            self.on_exit(None)

    # --- serving ---------------------------------------------------------------------------

    def serve(self, attempt: Attempt, run_frame: bytes, caller: contextvars.Context | None = None) -> WorkerAttempt:
        """Give ``attempt`` to this idle worker: its ``run`` goes out, its log opens.

        Raises ``ConnectionError`` when the worker is no longer connected (it exited idle).
        """
        logs = self._sup.logs
        log_path = logs.path(attempt.run_id, attempt.state_name, attempt.number)
        # Its output may come before this process runs again: the log is ready first.
        self.output.begin_attempt(log_path, logs.create, label_for(attempt.state_name, attempt.number))
        try:
            self.channel.send(self.secret, run_frame)
        except BaseException:
            self.output.end_attempt(logs)
            raise
        try:
            child = WorkerAttempt(self, attempt, log_path, caller)
        except OSError as exc:  # its cgroup is gone: the worker exited idle as its run went out
            self.output.end_attempt(logs)
            raise ConnectionError(f"worker {self.pid} is gone: {exc}") from None
        self._move(WorkerStatus.BUSY)
        self.attempt = child
        return child

    def _start_limit(self) -> FailureReason | None:
        """The limit of its cgroup its start hit (its memory limit below what a worker
        needs, say), read before the cgroup goes; None: none was hit."""
        try:
            return self.confinement.failure_reason(*exit_code_and_signal(self.exit_status))
        except Exception as exc:  # a report: never let it hide the start's failure
            self._sup.log.warning("worker_limits_unreadable", pid=self.pid, error=repr(exc))
            return None

    def start_failure(self) -> FailureReason:
        """Why this worker exited before it was ready, as the failure of an attempt waiting for it."""
        tail = self.output.between.decode("utf-8", "replace")
        if self._limit_failure is not None:
            return dataclasses.replace(self._limit_failure, traceback=self._limit_failure.traceback or tail)
        if self.failure_message is not None:
            return FailureReason(kind="exit_code", message=self.failure_message, traceback=tail)
        code, sig = exit_code_and_signal(self.exit_status)
        if sig is not None:
            return FailureReason(kind="signal", signal=sig, traceback=tail,
                                 message=f"the worker's process was killed by signal {sig} before it was ready")
        return FailureReason(kind="exit_code", exit_code=code, traceback=tail,
                             message=f"the worker's process exited with code {code} before it was ready "
                             "(confinement or channel setup failed): see the traceback")

    def ready(self) -> None:
        """It said hello: it started, or its attempt is over."""
        if self.status is WorkerStatus.STARTING:
            self._sup.launched(self)  # type: ignore[arg-type]
            self._move(WorkerStatus.IDLE)
            self.ready_at = time.monotonic()
            self._pool.worker_ready(self, None)
        elif self.status is WorkerStatus.BUSY and self.attempt is not None:
            attempt = self.attempt
            attempt.ended()
            self.served += 1
            self._move(WorkerStatus.IDLE)
            self._pool.worker_ready(self, attempt)
        else:
            self.violate("a hello while it was not serving an attempt")

    def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self.close_files()
        self._sup.forget(self)  # type: ignore[arg-type]
        if self.ready_at is None and not self.killed:  # it never started: a limit may say why
            self._limit_failure = self._start_limit()
        self.confinement.close()
        self._pool.worker_gone(self)

    def close_files(self) -> None:
        """Close the supervisor's files of this worker: its channel and its ``/proc`` stat file
        (also when the supervisor shuts down, whose zygote then takes the worker with it)."""
        if self._stat_fd is not None:
            os.close(self._stat_fd)
            self._stat_fd = None
        self.channel.close()

    # --- the host of its attempts (what ChildProcess asks of its supervisor) ------------------

    @property
    def config(self) -> Any:
        return self._sup.config

    @property
    def router(self) -> DirectChannel:
        return self.channel

    @property
    def closed(self) -> bool:
        return bool(self._sup.closed)

    @property
    def log(self) -> Any:
        return self._sup.log

    @property
    def bounds(self) -> Any:
        return self._sup.bounds

    @property
    def decoder(self) -> Any:
        return self._sup.decoder

    def kill_pid(self, pid: int) -> None:
        self.kill()

    def unqueue(self, child: ChildProcess) -> bool:
        return False

    def count_violation(self, child: ChildProcess, kind: str, message: str) -> None:
        self._sup.count_violation(child, kind, message)

    def launched(self, child: ChildProcess) -> None:
        return None

    def forget(self, child: ChildProcess) -> None:
        """``child``'s attempt is over (it ended, or the worker died): file its log and usage."""
        if child is not self.attempt:
            return
        attempt, self.attempt = self.attempt, None
        self.output.end_attempt(self._sup.logs)
        attempt.shared.end()
        if self.status is WorkerStatus.EXITED:
            self._cleanup()
        elif self.confinement.handle is not None and not self.killed:
            self.baseline = attempt.shared.final
            restart_peak(self.confinement.handle)
