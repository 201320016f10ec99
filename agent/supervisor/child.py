"""One state child as the supervisor sees it: an explicit lifecycle and its outcome.

The supervisor feeds it events (forked, hello, frame received, disconnected, exited);
the executor awaits :attr:`ChildProcess.exited` and then asks
:meth:`ChildProcess.outcome`. Whatever went wrong, the child is killed and reaped
before the outcome is known, and the outcome names exactly one kind of failure
(:data:`agent.errors.FAILURE_KINDS`).

Frames are handled in arrival order. One over :data:`OFF_LOOP_BYTES` is decoded in the
supervisor's decoder thread, so a big value never stalls the loop that serves the other
children; the child's later frames wait for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import enum
import errno
import gc
import os
import signal
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import values
from ..context import filled_by_others
from ..errors import (
    BoundExceededError,
    ContextBudgetError,
    CoordinationError,
    DaemonUnavailableError,
    FailureReason,
    HumanInputError,
    IllegalTransitionError,
    ProtocolError,
    exception_message,
    reported,
)
from ..executor import Attempt, AttemptFailed, AttemptOutcome, Isolation
from ..human import ask_relayed
from ..ipc import (
    FROM_CHILD,
    Cancel,
    CheckpointSnapshot,
    ContextWrite,
    CoordinationRequest,
    CoordinationResponse,
    Error,
    Hello,
    HumanInputRequest,
    HumanInputResponse,
    Log,
    Message,
    Preempt,
    Result,
    Welcome,
    encode_message,
)
from ..ipc.messages import decode_counted, value_size
from ..runtime.child import EXIT_SETUP_FAILED
from ..runtime.sandbox import DEFAULT_SHM_MB, DEFAULT_TMP_MB
from ..runtime.zygote import charged_with_children
from ..values import Bounds
from .confinement import Confinement

if TYPE_CHECKING:
    from .service import Supervisor

_WELCOME = encode_message(Welcome())

OFF_LOOP_BYTES = 256 * 1024
"""Frames at least this big are decoded off the event loop."""

_LOG_TAIL = 4000
MAX_TYPE_NAME = 256  # characters of an exception's dotted name a child reports
SANDBOX_NAMES = 64
"""Primitives a sandboxed attempt's code may make on first use (``mutex(name)``)."""
SANDBOX_QUESTIONS = 8
"""Human-input questions a sandboxed attempt may have open at once."""
MAX_VIOLATION_TEXT = 1000  # characters of a violation's message: it may quote a frame of megabytes
_FILE_TOO_LARGE = f"[Errno {errno.EFBIG}]"  # how OSError(EFBIG) prints: past RLIMIT_FSIZE
_NO_SPACE = f"[Errno {errno.ENOSPC}]"  # in a sandbox: one of its private tmpfs mounts is full
# What faulthandler writes to the log of a process a fatal signal ends (the zygote enables it).
_CRASH_STACK = "Fatal Python error: "
_ABORTED = "Fatal Python error: Aborted"
_NATIVE_CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})
# What a child may take before it joins its cgroup (a few hundred faults, a millisecond).
_CPU_SLACK = 0.05
_FAULT_SLACK = 2000
_PAGE = os.sysconf("SC_PAGE_SIZE")
_FAULT_BYTES = 16 * 1024 * 1024  # faults beyond the cgroup's peak by this much are looked into


class ChildStatus(enum.Enum):
    """Where a child is in its life."""

    LAUNCHING = "launching"  # fork requested, no hello yet
    RUNNING = "running"  # hello received, the state function sent
    REPORTED = "reported"  # result or error received
    EXITED = "exited"  # reaped by the zygote


_ALLOWED = {
    ChildStatus.LAUNCHING: {ChildStatus.RUNNING, ChildStatus.EXITED},
    ChildStatus.RUNNING: {ChildStatus.REPORTED, ChildStatus.EXITED},
    ChildStatus.REPORTED: {ChildStatus.EXITED},
    ChildStatus.EXITED: set(),
}


class _Decoded(NamedTuple):
    """One frame from the child, decoded: the message, its value, and what it counted."""

    msg: Message
    value: Any = None
    size: int = 0
    objects: int = 0


def decode_frame(frame: bytes | memoryview, bounds: Bounds, trusted: bool = False) -> _Decoded:
    """Decode a frame and size the value it carries; raises ProtocolError (BoundExceededError).

    From a ``trusted`` child (not a sandbox), a typed value's module is imported when this
    process has not imported it yet (a module only the state imports, as inline); a
    sandboxed child cannot make the supervisor import anything.
    """
    msg, objects = decode_counted(frame, bounds, FROM_CHILD, import_modules=trusted)
    if isinstance(msg, Result) or (isinstance(msg, ContextWrite) and not msg.deleted):
        return _Decoded(msg, msg.value, value_size(msg, len(frame)), objects)
    return _Decoded(msg, objects=objects)


def decode_off_loop(frame: bytes | memoryview, bounds: Bounds, trusted: bool = False) -> _Decoded:
    """:func:`decode_frame`, in the decoder thread, with the cyclic garbage collector paused.

    A frame of many small containers makes up to ``max_objects`` objects; collections
    triggered meanwhile would walk every object of the process with the GIL held, stalling
    the event loop for as long. Nothing of a refused frame outlives the call, and a value
    that is kept is collected later like any other.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        return decode_frame(frame, bounds, trusted)
    finally:
        if paused:
            gc.enable()


def sent_by(child_pid: int, peer_pid: int) -> bool:
    """Whether a hello with a child's secret, on a connection opened by ``peer_pid``, is the
    child's own.

    A child runs its state without waiting for its hello to be read, so a state that
    ends at once (``os._exit``, a closed socket) may have closed that connection, or
    been reaped, before then: the kernel then names no process (``peer_pid`` 0). Such a
    hello is taken as the child's: only the child's own processes know its secret, and
    the closed connection is then judged as the child's (it lost its connection).
    """
    return peer_pid == child_pid or peer_pid == 0


class _Pending(NamedTuple):
    """A connection whose hello waits for the zygote's report of the fork, and its frames."""

    route: bytes
    fd: int
    peer_pid: int
    frames: list[list[bytes | memoryview]]


class ChildProcess:
    """The supervisor's record of one forked child serving one attempt."""

    def __init__(
        self,
        supervisor: "Supervisor",
        attempt: Attempt,
        confinement: Confinement,
        *,
        secret: bytes,
        request_id: int,
        log_path: str,
        run_frame: bytes | None,
        bounds: Bounds,
        caller: contextvars.Context | None = None,
    ) -> None:
        self._sup = supervisor
        self.attempt = attempt
        self.confinement = confinement
        self.secret = secret
        self.request_id = request_id
        self.log_path = log_path
        self._run_frame: bytes | None = run_frame
        self._bounds = bounds
        self._trusted = attempt.isolation is not Isolation.SANDBOX
        self.status = ChildStatus.LAUNCHING
        self.pid: int | None = None
        self.fd: int | None = None
        self.route: bytes | None = None
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._answered: asyncio.Future[None] | None = None  # see answered()
        self._heard: asyncio.Future[None] | None = None  # see _hello_or_end()
        self._charged_before: tuple[float, int] = (0.0, 0)  # what a parked child took before
        self._result: tuple[Any] | None = None
        self._error: FailureReason | None = None
        self._log_cap: int | None = None  # the log passed the cap and the child was stopped
        self._violation: FailureReason | None = None
        self._kill_requested = False
        self._stopping = False  # asked to stop: closing its connection early is expected
        self._hurry: asyncio.Future[None] | None = None  # done: the stop's grace is over (hurry())
        self._timers: list[asyncio.TimerHandle] = []
        self._exit_known = False
        self.reported_at: float | None = None  # wall clock: when its result or error came
        self._exit_status: int | None = None
        self._exit_cpu: float | None = None
        self._exit_faults: int | None = None
        self._disconnected = False
        self.pending: list[_Pending] = []  # hellos heard before the fork was reported
        self._inbox: collections.deque[bytes | memoryview] = collections.deque()
        self._decoding = False
        self._finalize_wanted = False
        self._bytes_in = 0
        self._objects_in = 0
        self._human: set[asyncio.Task[None]] = set()
        self._questions: dict[int, str] = {}  # the child's question -> its request id (ask_relayed)
        # Primitives the state's code takes (mutex(), ResourceAllocation) are taken in the
        # context of the attempt's own task (``caller``; else this one, where it launched):
        # its coordinator, and its owner in that coordinator.
        self._context = caller if caller is not None else contextvars.copy_context()
        # The run's context as the child saw it at launch, and what its writes added since:
        # what it could check its writes against (see _over_budget).
        self._launch_used = attempt.context.budget.used
        self._written = 0
        self._taking: dict[int, asyncio.Task[None]] = {}  # request id -> a take still waiting
        self._holding: dict[int, Any] = {}  # request id -> a holding to give back
        self._made: set[str] = set()  # names a sandboxed state's mutex() made (see _take)
        self.checkpoint_keys: list[str] | None = None
        self.denied_calls: list[str] = []  # system calls its seccomp filter refused
        self._spawn_error: str | None = None
        self._shut_down = False  # the supervisor shut down while it ran (on_shutdown)

    def _move(self, new: ChildStatus) -> None:
        if new not in _ALLOWED[self.status]:
            raise IllegalTransitionError(f"child {self.pid}: {self.status.value} -> {new.value}")
        self.status = new

    def _later(self, delay: float, callback: Any) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(delay, callback))

    # --- events from the supervisor --------------------------------------------------------

    def on_spawned(self, pid: int, charged: list[float] | None = None) -> None:
        """Forked (or handed a parked child) as ``pid``; ``charged`` is what a parked child took
        before (CPU seconds, page faults), left out of its figures."""
        self.pid = pid
        if charged:
            self._charged_before = (float(charged[0]), int(charged[1]))
        started = getattr(self.confinement, "started", None)
        if started is not None:
            started(pid)  # e.g. the no-cgroup watchdog follows the pid
        if self._kill_requested:
            self._sup.kill_pid(pid)
            return
        pending, self.pending = self.pending, []
        for route, fd, peer_pid, frames in pending:
            if sent_by(pid, peer_pid) and self.status is ChildStatus.LAUNCHING:
                self._start(route, fd)
                for held in frames:
                    self._sup.deliver(route, held, fd)
            else:
                self._sup.unbind(self, route, fd, dropped=len(frames))
                self._sup.blame(fd, f"this state's process sent a hello with the identity of "
                                    f"{self.describe()}", peer_pid)

    def on_denied(self, call: str) -> None:
        """The sandbox's seccomp filter refused ``call`` (reported by the zygote)."""
        if call not in self.denied_calls:
            self.denied_calls.append(call)

    def on_spawn_failed(self, error: str) -> None:
        """The zygote could not fork this child."""
        self._spawn_error = error
        self.on_exit(None)

    def on_hello(self, route: bytes, fd: int, peer_pid: int) -> None:
        """A hello with this child's secret on a new connection opened by ``peer_pid``.

        The supervisor has checked ``peer_pid`` against the forked pid when it knew it; else
        the check waits for the zygote's report of the fork, and so do the frames that follow
        on that connection (a child runs its state without waiting for the supervisor).
        """
        if self.pid is None:
            self.pending.append(_Pending(route, fd, peer_pid, []))
            self._sup.bind(self, route, fd)
            return
        self._start(route, fd)

    def hold(self, route: bytes, frames: list[bytes | memoryview]) -> None:
        """Frames on a connection whose hello waits for the fork report: kept until then."""
        for pending in self.pending:
            if pending.route == route:
                pending.frames.append(frames)
                return

    def describe(self) -> str:
        a = self.attempt
        return f"state {a.state_name!r} (run {a.run_id[:8]}, attempt {a.number})"

    def _start(self, route: bytes, fd: int) -> None:
        self._move(ChildStatus.RUNNING)
        self._hear()
        self.route, self.fd = route, fd
        self._sup.bind(self, route, fd)
        self._sup.launched(self)
        frame, self._run_frame = self._run_frame, None
        # Without a run to send (the child got it with its spec), a welcome: it may close now.
        self._send(frame if frame is not None else _WELCOME)
        if self._disconnected and not self._exit_known and not self._stopping:
            self._later(self._sup.config.grace, self._connection_lost)  # lost while it launched

    def on_exit(self, status: int | None, cpu: float | None = None, faults: int | None = None) -> None:
        """The zygote reaped the child (``None``: the zygote is gone, or it never forked), which
        the kernel charged ``cpu`` seconds and ``faults`` page faults in its life."""
        if self.status is ChildStatus.EXITED or self._exit_known:
            return
        self._exit_known = True
        self._exit_status = status
        before_cpu, before_faults = self._charged_before  # a parked child's warm-up
        self._exit_cpu = None if cpu is None else max(0.0, cpu - before_cpu)
        self._exit_faults = None if faults is None else max(0, faults - before_faults)
        if status is not None and self.status is not ChildStatus.REPORTED and not self._disconnected:
            # Its last frames (its hello too: a child runs its state without waiting for the
            # supervisor) may still be on their way: they are read before the disconnect.
            self._later(self._sup.config.grace, self._finalize)
        else:
            self._finalize()

    def on_shutdown(self) -> None:
        """The supervisor shut down (its zygote, taking this process along, with it): the
        attempt ends now, saying so; nothing will report this process's exit any more."""
        self._shut_down = True
        self.on_exit(None)

    def on_disconnect(self) -> None:
        self._disconnected = True
        if self._exit_known:
            self._finalize()
        elif self.status is ChildStatus.RUNNING and not self._stopping:
            # Its exit report normally follows at once; a process that stays alive without its
            # connection is killed (libzmq drops a connection that sends a frame over the cap).
            self._later(self._sup.config.grace, self._connection_lost)

    def _connection_lost(self) -> None:
        if not self._exit_known:
            self.violate(
                "the state's process lost its connection to the supervisor before it reported, and "
                "kept running: it was killed (the state closed that connection, or sent a frame over "
                f"the {self._bounds.max_frame:,}-byte cap, for which libzmq drops it)"
            )

    def _finalize(self) -> None:
        if self.status is ChildStatus.EXITED:
            return
        if (self._decoding or self._inbox) and self._violation is None:
            self._finalize_wanted = True  # frames it sent are still being decoded
            return
        if self._dropped_by_router():
            tail = self._log_tail()
            see = "see the log below" if tail.strip() else (
                "its log is empty (closing every descriptor, as os.closerange(0, ...) does, closes the log too)")
            self.violate(
                "the state's connection broke before it reported, and its process exited (code "
                f"{EXIT_SETUP_FAILED}): the state closed or wrote into that connection, or sent a frame "
                f"over the {self._bounds.max_frame:,}-byte cap (libzmq then drops it); {see}",
                traceback=tail,
            )
        self._move(ChildStatus.EXITED)
        self._inbox.clear()
        for timer in self._timers:
            timer.cancel()
        for task in self._human:
            task.cancel()
        try:
            self._give_all_back()
            self._sup.forget(self)
        finally:  # the attempt ends even when the supervisor's cleanup of it raised (said by the caller)
            self._answer_now()
            self._hear()
            if not self.exited.done():
                try:
                    self.exited.set_result(self._exit_status)
                except RuntimeError:  # its event loop is closed: nobody awaits it any more
                    pass

    def log_over_cap(self, cap: int) -> None:
        """The state printed more than its log may hold (a sandbox's file size limit): stop it."""
        self._log_cap = cap
        self.kill()

    def _dropped_by_router(self) -> bool:
        """Connected, cut off before it reported, then exited as a child whose channel failed."""
        status = self._exit_status
        return (self._violation is None and self._disconnected and self.status is ChildStatus.RUNNING
                and not self._stopping and status is not None and os.WIFEXITED(status)
                and os.WEXITSTATUS(status) == EXIT_SETUP_FAILED)

    def violate(self, message: str, *, kind: str = "protocol", traceback: str = "") -> None:
        """Record a protocol violation (or a bound passed) and kill the child."""
        message = values.shortened(message, MAX_VIOLATION_TEXT)  # it may quote the child's frame
        if self._violation is None:
            self._violation = FailureReason(kind=kind, message=message, traceback=traceback)
            self._sup.count_violation(self, kind, message)
        self._inbox.clear()
        self.kill()

    # --- frames ---------------------------------------------------------------------------

    def receive(self, frame: bytes | memoryview) -> None:
        """A frame from this child's connection; handled after the ones before it."""
        if self._violation is not None or self.status is ChildStatus.EXITED:
            return
        self._bytes_in += len(frame)
        if self._bytes_in > self._bounds.attempt_bytes:
            self.violate(f"the attempt sent more than {self._bounds.attempt_bytes:,} bytes in all "
                         "(the per-attempt bytes bound)", kind="bound")
            return
        if self._decoding or self._inbox:
            self._inbox.append(frame)
        else:
            self._handle(frame)

    def _handle(self, frame: bytes | memoryview) -> None:
        if len(frame) >= OFF_LOOP_BYTES:
            self._decoding = True
            future = self._sup.decoder.submit(decode_off_loop, frame, self._bounds, self._trusted)
            asyncio.wrap_future(future).add_done_callback(self._decoded)
            return
        try:
            decoded = decode_frame(frame, self._bounds, self._trusted)
        except ProtocolError as exc:
            self._refuse(exc)
            return
        self._apply(decoded)

    def _decoded(self, future: asyncio.Future[_Decoded]) -> None:
        self._decoding = False
        if future.cancelled() or self.status is ChildStatus.EXITED or self._violation is not None:
            self._resume()
            return
        exc = future.exception()
        if isinstance(exc, ProtocolError):
            self._refuse(exc)
        elif exc is not None:
            self.violate(f"decoding a frame failed: {exc!r}")
        else:
            self._apply(future.result())
        while self._inbox and not self._decoding and self._violation is None:
            self._handle(self._inbox.popleft())
        self._resume()

    def _resume(self) -> None:
        if self._finalize_wanted and not self._decoding and (not self._inbox or self._violation is not None):
            self._finalize_wanted = False
            self._finalize()

    def _refuse(self, exc: ProtocolError) -> None:
        self.violate(str(exc), kind="bound" if isinstance(exc, BoundExceededError) else "protocol")

    def _apply(self, decoded: _Decoded) -> None:
        self._objects_in += decoded.objects
        if self._objects_in > self._bounds.attempt_objects:
            self.violate(f"the attempt sent more than {self._bounds.attempt_objects:,} objects in all "
                         "(the per-attempt objects bound)", kind="bound")
            return
        try:
            self._dispatch(decoded)
        except ProtocolError as exc:
            self._refuse(exc)
        except ContextBudgetError as exc:
            self._over_budget(exc, decoded)
        except Exception as exc:  # applying the message failed (e.g. a context hook raised)
            self.violate(f"applying a {decoded.msg.TYPE} message failed: {exc!r}")

    def _dispatch(self, decoded: _Decoded) -> None:
        msg = decoded.msg
        if isinstance(msg, Hello):
            raise ProtocolError("a second hello from the same child")
        if self.status is not ChildStatus.RUNNING:
            raise ProtocolError(f"{msg.TYPE} message while the child is {self.status.value}")
        if isinstance(msg, ContextWrite):
            scope = getattr(self.attempt.context, "scope", None)
            if scope is not None and not scope.allows(msg.key):
                raise ProtocolError(
                    f"the state wrote context key {values.short_repr(msg.key)}, outside its context_keys")
            context = self.attempt.context
            sizes = context.budget.sizes
            before = sizes.get(msg.key, 0)
            if msg.deleted:
                context.remove_state(msg.key)
            else:
                context._store(msg.key, decoded.value, values.entry_size(msg.key, decoded.size))
            self._written += sizes.get(msg.key, 0) - before
        elif isinstance(msg, Result):
            self._result = (values.NotATransition(reported(msg.not_a_transition)) if msg.not_a_transition
                            else decoded.value,)
            self._reported()
        elif isinstance(msg, Error):
            exception_type = reported(msg.exception_type, MAX_TYPE_NAME)
            self._error = FailureReason(
                kind="exception",
                message=exception_message(exception_type.rpartition('.')[2], reported(msg.message)),
                traceback=reported(msg.traceback, tail=True),
                exception_type=exception_type,
            )
            self._reported()
        elif isinstance(msg, HumanInputRequest):
            if not self._trusted and len(self._human) >= SANDBOX_QUESTIONS:
                self._send(encode_message(HumanInputResponse(
                    request_id=msg.request_id, answer=None, error_type="HumanInputError",
                    error=f"a sandboxed state may have at most {SANDBOX_QUESTIONS} questions open at once: "
                          "wait for an answer before asking more")))
                return
            task = asyncio.ensure_future(self._answer(msg))
            self._human.add(task)
            task.add_done_callback(self._human.discard)
        elif isinstance(msg, CoordinationRequest):
            self._coordinate(msg)
        elif isinstance(msg, CheckpointSnapshot):
            self.checkpoint_keys = list(msg.keys)
        elif isinstance(msg, Log):
            self._sup.log.info("child_log", pid=self.pid, state=self.attempt.state_name,
                               level=msg.level, message=msg.message)

    def _over_budget(self, exc: ContextBudgetError, decoded: _Decoded) -> None:
        """A write the run's context budget cannot take: a bound the child passed, unless what
        it could see (its snapshot and its own writes) left room for it, when other states'
        writes filled the budget meanwhile: it is stopped, not judged, and its retry sees them
        (and its write then raises ContextBudgetError in the state)."""
        msg = decoded.msg
        size = values.entry_size(msg.key, decoded.size)  # type: ignore[union-attr]
        stopped = filled_by_others(exc, self._launch_used + self._written, size, self.attempt.context.budget.limit)
        if stopped is None:
            self.violate(f"{exc} (the context budget bound)", kind="bound")
            return
        if self._violation is None:
            self._violation = stopped
        self._inbox.clear()
        self.kill()

    def _reported(self) -> None:
        self._move(ChildStatus.REPORTED)
        self.reported_at = time.time()
        if self._result is not None:
            self._answer_now()
        if self._exit_known:  # its exit was heard before its last frames: nothing more will come
            self._finalize()
            return
        # The child exits right after reporting; one that lingers is killed.
        self._later(self._sup.config.grace, self.kill)

    def _send(self, frame: bytes) -> None:
        try:
            self._sup.router.send(self.route, frame)  # type: ignore[arg-type]
        except ConnectionError:
            pass  # it is gone: its exit report says how

    async def _answer(self, req: HumanInputRequest) -> None:
        answer: str | None = None
        error_type = error = None
        try:
            answer = await ask_relayed(self.attempt.context, self._questions, req.question, req.prompt, req.timeout,
                                       req.default, req.attempt, req.rejected, req.left)
        except HumanInputError as exc:
            error_type, error = type(exc).__name__, str(exc)
        except Exception as exc:  # a provider failed: the child raises HumanInputError
            error_type, error = "HumanInputError", f"human input failed: {exc!r}"
        if self.status is ChildStatus.RUNNING:
            self._send(encode_message(HumanInputResponse(
                request_id=req.request_id, answer=answer, error_type=error_type, error=error
            )))

    # --- coordination taken by the state's code -------------------------------------------

    def _coordinate(self, req: CoordinationRequest) -> None:
        if req.op == "give_back":
            waiting = self._taking.pop(req.request_id, None)
            if waiting is not None:
                waiting.cancel()  # it stopped waiting (cancelled)
            held = self._holding.pop(req.request_id, None)
            if held is not None:
                held.give_back()
            return
        if req.op != "take" or req.request_id in self._taking or req.request_id in self._holding:
            raise ProtocolError(
                f"coordination request {req.request_id} ({values.short_repr(req.op)}) is not a new take")
        loop = asyncio.get_running_loop()
        self._taking[req.request_id] = loop.create_task(self._take(req), context=self._context)

    async def _take(self, req: CoordinationRequest) -> None:
        from ..coordination.allocation import attempt_owner, current_owner, sub_owner, take_for_child

        attempt = self.attempt
        owner = req.owner or current_owner() or attempt_owner(
            attempt.agent_name, attempt.run_id, attempt.state_name, attempt.number)
        if req.owner is None and req.task:  # a task the state started: an owner of its own
            owner = sub_owner(owner, req.task)
        elif req.owner is not None and not self._trusted:  # never a trusted code's owner
            owner = f"sandbox {attempt.agent_name}/{req.owner}"
        error_type = error = None
        try:
            if not self._trusted:
                self._sandbox_may_take(req)
            held = await take_for_child(req.kind, req.name, owner, req.amount, req.ttl, req.timeout)
        except (CoordinationError, DaemonUnavailableError) as exc:
            error_type, error = type(exc).__name__, str(exc)
        except Exception as exc:  # noqa: BLE001 - a bad request: the state's code raises it
            error_type, error = "CoordinationError", f"{req.kind} {req.name!r}: {exc!r}"
        else:
            if self._taking.pop(req.request_id, None) is None or self.status is not ChildStatus.RUNNING:
                held.give_back()  # given back, or the attempt ended, while it was taken
                return
            self._holding[req.request_id] = held
        finally:
            self._taking.pop(req.request_id, None)
        if self.status is ChildStatus.RUNNING:
            self._send(encode_message(CoordinationResponse(request_id=req.request_id, error_type=error_type,
                                                           error=error)))

    def _sandbox_may_take(self, req: CoordinationRequest) -> None:
        """What untrusted code may do to the coordinator that trusted code shares: take what is
        there, or make a plain MUTEX, at most :data:`SANDBOX_NAMES` of them; never set a
        primitive's ``ttl``, which would take it from the trusted holders after it."""
        from ..coordination.allocation import current_coordinator

        what = f"{req.kind} {req.name!r}"
        if req.ttl is not None:
            raise CoordinationError(f"{what}: a sandboxed state cannot give a primitive a ttl; declare it "
                                    "with add_state_coordination() or take it first in trusted code")
        if req.kind == "mutex" and current_coordinator().primitive(req.name) is None:
            if len(self._made) >= SANDBOX_NAMES:
                raise CoordinationError(f"{what}: a sandboxed state may make at most {SANDBOX_NAMES} "
                                        "primitives; reuse names")
            self._made.add(req.name)

    def _give_all_back(self) -> None:
        """The attempt is over: whatever its code still holds or waits for is given back."""
        for waiting in self._taking.values():
            waiting.cancel()
        self._taking.clear()
        holding, self._holding = self._holding, {}
        for held in holding.values():
            held.give_back()

    # --- the cgroup it was put in ---------------------------------------------------------

    def _in_cgroup(self) -> bool:
        return self.confinement.handle is not None and self.confinement.backend_name != "none"

    def _escape(self, usage: dict[str, Any]) -> FailureReason | None:
        """Whether the process left its cgroup (see :func:`escape_reason`)."""
        if not self._in_cgroup():
            return None
        return escape_reason(self.confinement, usage, self._exit_cpu, self._exit_faults)

    # --- control ------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the child (and its process group) through the zygote."""
        if self.status is ChildStatus.EXITED or self._exit_known:
            return
        self._kill_requested = True
        self._stopping = True
        if self.pid is not None:
            self._sup.kill_pid(self.pid)
        elif self._sup.unqueue(self):
            self.on_exit(None)  # never forked

    async def stop(self, reason: str, grace: float) -> None:
        """Ask the child to stop (cancel or preempt), wait ``grace`` seconds (or until
        :meth:`hurry`), then kill it."""
        self._stopping = True
        hurry = self._hurry_future()
        reason = str(getattr(reason, "value", reason))  # the engine's StopReason: a plain string on the wire
        if self.status is ChildStatus.LAUNCHING and self._sup.unqueue(self):
            self.on_exit(None)  # its fork was not even asked for
        elif self.status is ChildStatus.LAUNCHING:
            # Forked (or about to be): a child runs its state without waiting for the
            # supervisor, so its hello and what it wrote since may be on their way (unread,
            # or still in libzmq's thread on a busy machine). They are waited for, within
            # the grace period, so that the state is asked to stop and keeps its progress.
            self._sup.catch_up()
            if self.status is ChildStatus.LAUNCHING:
                await asyncio.wait((self._hello_or_end(), hurry), timeout=grace,
                                   return_when=asyncio.FIRST_COMPLETED)
        if self.status is ChildStatus.RUNNING:
            self._send(encode_message(Preempt(reason=reason) if reason == "preempt" else Cancel(reason=reason)))
            await asyncio.wait((self.exited, hurry), timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        if not self.exited.done():
            self.kill()
            self.confinement.kill()
        await asyncio.shield(self.exited)

    def hurry(self) -> None:
        """The stop under way (or the next) has no more time: its run's ``cleanup_timeout``
        is over, shorter than the grace it began with (a state's own timeout stopped it)."""
        hurry = self._hurry_future()
        if not hurry.done():
            hurry.set_result(None)

    def _hurry_future(self) -> asyncio.Future[None]:
        if self._hurry is None:  # made on the first stop only: most children are never stopped
            self._hurry = asyncio.get_running_loop().create_future()
        return self._hurry

    # --- the verdict ----------------------------------------------------------------------

    def answered(self) -> asyncio.Future[None]:
        """A future done when the child's result is in, or when it is gone (whichever first)."""
        if self._answered is None:
            self._answered = asyncio.get_running_loop().create_future()
            if self._result is not None or self.status is ChildStatus.EXITED:
                self._answered.set_result(None)
        return self._answered

    def _hello_or_end(self) -> asyncio.Future[None]:
        """A future done once the child's hello is believed, or once it is gone."""
        if self._heard is None:
            self._heard = asyncio.get_running_loop().create_future()
            if self.status is not ChildStatus.LAUNCHING:
                self._heard.set_result(None)
        return self._heard

    def _hear(self) -> None:
        if self._heard is not None and not self._heard.done():
            self._heard.set_result(None)

    def _answer_now(self) -> None:
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(None)

    def returned(self) -> bool:
        """Whether the state's result came in, and stands (no violation since)."""
        return self._result is not None and self._violation is None

    def outcome_now(self) -> AttemptOutcome | None:
        """The outcome while the process still exits: its result, with its usage read now.

        None when only its end can tell: no result (a failure is judged on its exit
        status and limit events), a violation, a process already reaped, or figures that
        look like it left its cgroup (its exit then settles it, with the kernel's figures).
        """
        if self._result is None or self._violation is not None or self._exit_known or self.pid is None:
            return None
        charged = charged_with_children(self.pid)
        if charged is None:
            return None
        try:
            usage = self.confinement.usage()
        except Exception:
            return None  # read again, and logged, once it exited
        if self._in_cgroup():
            cpu, faults = charged[0] - self._charged_before[0], charged[1] - self._charged_before[1]
            if escape_reason(self.confinement, usage, cpu, faults) is not None:
                return None
        return AttemptOutcome(self._result[0], usage)

    def outcome(self, status: int | None) -> AttemptOutcome:
        """What the attempt returned, or raise :class:`AttemptFailed` saying why it did not."""
        try:
            usage = self.confinement.usage()
        except Exception as exc:  # usage is a report: never let it hide the outcome
            self._sup.log.warning("usage_unreadable", state=self.attempt.state_name, error=repr(exc))
            usage = {}
        escape = self._escape(usage)
        if escape is not None:
            raise AttemptFailed(escape, {})  # its cgroup's figures are not the process's
        if self._result is not None and self._violation is None:  # killed for cheating: no result
            return AttemptOutcome(self._result[0], usage)
        raise AttemptFailed(self._failure(status), usage)

    def _failure(self, status: int | None) -> FailureReason:
        exit_code, sig = exit_code_and_signal(status)
        # A limit hit explains everything else (a refused fork surfaces as an exception).
        limit = self.confinement.failure_reason(exit_code, sig)
        if limit is not None:
            if self._error is not None and not limit.traceback:
                limit = dataclasses.replace(limit, traceback=self._error.traceback)
            return limit
        if self._log_cap is not None or (self._error is not None and _FILE_TOO_LARGE in self._error.message):
            cap = self._log_cap or self.confinement.child_spec.get("sandbox", {}).get("rlimits", {}).get("fsize")
            if cap:
                error = self._error or FailureReason(kind="limit", message="")
                return FailureReason(
                    kind="limit", traceback=error.traceback, exception_type=error.exception_type,
                    message=f"file size limit {cap / (1 << 20):.4g} MiB (RLIMIT_FSIZE): a file the state wrote, "
                    "or its log, reached it; write less, or raise AGENT_SANDBOX_FILE_MB",
                    details={"limit": "file_size", "limit_bytes": cap},
                )
        sandbox = self.confinement.child_spec.get("sandbox")
        if sandbox is not None and self._error is not None and _NO_SPACE in self._error.message:
            # Its only writable places are its private tmpfs mounts, each as large as they were made.
            tmp_mb = int(sandbox.get("tmp_mb", DEFAULT_TMP_MB))
            return FailureReason(
                kind="limit", traceback=self._error.traceback, exception_type=self._error.exception_type,
                message=f"{self._error.message}: a private filesystem of the sandbox is full (/tmp and /var/tmp "
                f"hold {tmp_mb} MiB, /dev/shm {int(sandbox.get('shm_mb', DEFAULT_SHM_MB))} MiB); write less "
                "there, or raise AGENT_SANDBOX_TMP_MB",
                details={"limit": "tmp_size", "limit_bytes": tmp_mb << 20},
            )
        if self.denied_calls and (self._error is not None or self._violation is None):
            return self._seccomp_reason(exit_code, sig)
        if self._error is not None:
            return self._error
        if self._violation is not None:
            return self._violation  # the supervisor killed it for that
        if status is None and self._spawn_error is not None:
            return FailureReason(kind="exit_code", message=f"the state's process could not be started: "
                                 f"{self._spawn_error}")
        if (status is None and self._shut_down) or (sig == signal.SIGKILL and self._sup.closed):
            return FailureReason(
                kind="lost_connection",
                message="the supervisor shut down while the state ran (shutdown_supervisor(), or the "
                        "program exiting); its process was killed",
            )
        if status is None:
            return FailureReason(
                kind="lost_connection",
                message="the zygote that forked this state's process died; the process was killed",
            )
        tail = self._log_tail()
        if sig is not None:
            return FailureReason(kind="signal", message=f"the state's process {self._ended_by(sig, tail)}",
                                 traceback=tail, signal=sig)
        if exit_code == EXIT_SETUP_FAILED:
            return FailureReason(kind="exit_code", exit_code=exit_code, traceback=tail,
                                 message="the state's process could not start, or lost its channel to "
                                 "the supervisor (confinement or connection failed): see the traceback")
        if exit_code:
            return FailureReason(kind="exit_code", exit_code=exit_code, traceback=tail,
                                 message=f"the state's process exited with code {exit_code} before reporting")
        return FailureReason(kind="lost_connection", traceback=tail, exit_code=0,
                             message="the state's process exited without reporting a result")

    def _ended_by(self, sig: int, tail: str) -> str:
        """How the signal ``sig`` ended the process, and where to look (``tail``: its log's end,
        with the Python stack a crash in native code wrote there: see :mod:`agent.runtime.zygote`)."""
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        stack = "the traceback shows the Python line it was on" if _CRASH_STACK in tail else "its log may say more"
        if sig == signal.SIGKILL and not self._kill_requested:
            return (f"was killed by {name} from outside the supervisor (no limit of its own cgroup was hit: a "
                    "limit of a cgroup around it, such as an agentd user quota or a systemd unit's MemoryMax, "
                    "or another process)")
        if sig == signal.SIGABRT and not tail.strip():
            return (f"was killed by {name} with nothing in its log (a state that closes every descriptor, as "
                    "os.closerange(0, ...) does, takes its event loop's and its log's, and aborts)")
        if _ABORTED in tail:  # PID 1 of a sandbox cannot die of its own SIGABRT: abort() ends it another way
            how = "" if sig == signal.SIGABRT else f"; as PID 1 of its sandbox it ended by {name}"
            return f"aborted (abort(): native code, or the interpreter, gave up{how}); {stack}"
        if sig in _NATIVE_CRASHES:
            return (f"was killed by {name}: a crash in native code (an extension module, ctypes, or the "
                    f"interpreter itself); {stack}")
        return f"was killed by {name}"

    def _seccomp_reason(self, exit_code: int | None, sig: int | None) -> FailureReason:
        calls = ", ".join(self.denied_calls)
        then = f"; then {self._error.message}" if self._error is not None else ""
        if self._error is None and sig is not None:
            then = f"; then it was killed by signal {sig}"
        elif self._error is None and exit_code:
            then = f"; then it exited with code {exit_code}"
        error = self._error
        return FailureReason(
            kind="seccomp",
            message=f"seccomp: the sandbox refused the system call(s) {calls} with EPERM{then}",
            traceback=error.traceback if error is not None else self._log_tail(),
            exit_code=exit_code,
            signal=sig,
            exception_type=error.exception_type if error is not None else None,
            details={"calls": list(self.denied_calls)},
        )

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - _LOG_TAIL))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""


def exit_code_and_signal(status: int | None) -> tuple[int | None, int | None]:
    """A wait status as (exit code, signal): one of them, or neither (None: no status)."""
    if status is None:
        return None, None
    return (os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)


def escape_reason(
    confinement: Confinement, usage: dict[str, Any], cpu: float | None, faults: int | None,
) -> FailureReason | None:
    """Whether a process left its cgroup: the kernel charged it more than the cgroup saw.

    CPU time and page faults count in the cgroup a process is in when it spends or takes
    them, so a process that moved out (to shed its memory or CPU limit) has figures of its
    own (``cpu`` seconds and ``faults``, from ``wait4``) well above its cgroup's (``usage``).
    """
    cgroup_cpu, cgroup_faults = usage.get("cpu_seconds"), None
    if cgroup_cpu is not None:
        # Against all its cgroup counted, what a parked child did there before its launch
        # too (which the attempt's usage leaves out): the process's own figures start at
        # another moment (when it had its spec, read in clock ticks; at its fork, for a
        # child forked into the cgroup of a parked child that was gone), and the check
        # must not take the difference for an escape.
        cgroup_cpu += confinement.counted_before()
    why = None
    # memory.stat is costly to read: only when the faults are more than its peak explains.
    if faults is not None and faults * _PAGE > usage.get("peak_memory_bytes", 0) + _FAULT_BYTES:
        cgroup_faults = confinement.page_faults()
        if cgroup_faults is not None and faults > cgroup_faults * 1.05 + _FAULT_SLACK:
            why = f"it took {faults:,} page faults, its cgroup saw {cgroup_faults:,}"
    elif cpu is not None and cgroup_cpu is not None and cpu > cgroup_cpu * 1.05 + _CPU_SLACK:
        why = f"the kernel charged it {cpu:.3f} CPU-s, its cgroup only {cgroup_cpu:.3f}"
    if why is None:
        return None
    return cgroup_escape(why, {"cgroup_cpu_seconds": cgroup_cpu, "process_cpu_seconds": cpu,
                               "cgroup_page_faults": cgroup_faults, "process_page_faults": faults})


def cgroup_escape(why: str, details: dict[str, Any]) -> FailureReason:
    """The failure of a state whose process left the cgroup it was put in (``why``)."""
    return FailureReason(
        kind="cgroup_escape",
        message=(f"the state's process left the cgroup it was put in ({why}): its limits did not "
                 "hold and its usage figures are unknown; isolation='process' running as root "
                 "is not a security boundary: run untrusted code with isolation='sandbox'"),
        details=details,
    )
