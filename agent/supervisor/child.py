"""One state child as the supervisor sees it: an explicit lifecycle and its outcome.

The supervisor feeds it events (forked, frame received, disconnected, exited); the
executor awaits :attr:`ChildProcess.exited` and then asks :meth:`ChildProcess.outcome`.
Whatever went wrong, the child is killed and reaped before the outcome is known.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import errno
import os
import signal
from typing import TYPE_CHECKING, Any

from ..errors import FailureReason, HumanInputError, IllegalTransitionError, ProtocolError
from ..executor import Attempt, AttemptFailed, AttemptOutcome
from ..ipc import (
    Cancel,
    CheckpointSnapshot,
    ContextWrite,
    Error,
    Hello,
    HumanInputRequest,
    HumanInputResponse,
    Limits,
    Log,
    Message,
    Preempt,
    Result,
    decode_value,
    encode_message,
)
from ..runtime.child import EXIT_SETUP_FAILED
from .confinement import Confinement

if TYPE_CHECKING:
    from .service import Supervisor

_LOG_TAIL = 4000
_FILE_TOO_LARGE = f"[Errno {errno.EFBIG}]"  # how OSError(EFBIG) prints: past RLIMIT_FSIZE
_DROPPED = (
    "the child's connection closed before it reported (libzmq drops a connection that sends "
    "a frame over the {cap}-byte cap)"
)


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
        limits: Limits,
    ) -> None:
        self._sup = supervisor
        self.attempt = attempt
        self.confinement = confinement
        self.secret = secret
        self.request_id = request_id
        self.log_path = log_path
        self._run_frame: bytes | None = run_frame
        self._limits = limits
        self.status = ChildStatus.LAUNCHING
        self.pid: int | None = None
        self.fd: int | None = None
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._result: tuple[Any] | None = None
        self._error: FailureReason | None = None
        self._log_cap: int | None = None  # the log passed the cap and the child was stopped
        self._violation: FailureReason | None = None
        self._violation_hard = False
        self._kill_requested = False
        self._stopping = False  # asked to stop: closing its connection early is expected
        self._kill_timer: asyncio.TimerHandle | None = None
        self._settle_timer: asyncio.TimerHandle | None = None
        self._exit_known = False
        self._exit_status: int | None = None
        self._disconnected = False
        self._human: set[asyncio.Task[None]] = set()
        self.checkpoint_keys: list[str] | None = None
        self.denied_calls: list[str] = []  # system calls its seccomp filter refused
        self._spawn_error: str | None = None

    def _move(self, new: ChildStatus) -> None:
        if new not in _ALLOWED[self.status]:
            raise IllegalTransitionError(f"child {self.pid}: {self.status.value} -> {new.value}")
        self.status = new

    # --- events from the supervisor --------------------------------------------------------

    def on_spawned(self, pid: int) -> None:
        self.pid = pid
        started = getattr(self.confinement, "started", None)
        if started is not None:
            started(pid)  # e.g. the no-cgroup watchdog follows the pid
        if self._kill_requested:
            self._sup.kill_pid(pid)

    def on_denied(self, call: str) -> None:
        """The sandbox's seccomp filter refused ``call`` (reported by the zygote)."""
        if call not in self.denied_calls:
            self.denied_calls.append(call)

    def on_spawn_failed(self, error: str) -> None:
        """The zygote could not fork this child."""
        self._spawn_error = error
        self.on_exit(None)

    def on_exit(self, status: int | None) -> None:
        """The zygote reaped the child (``None``: the zygote is gone, or it never forked)."""
        if self.status is ChildStatus.EXITED or self._exit_known:
            return
        self._exit_known = True
        self._exit_status = status
        if status is not None and self.status is not ChildStatus.REPORTED and not self._disconnected:
            # Its last frames (its hello too: a child runs its state without waiting for the
            # supervisor) may still be on their way: they are read before the disconnect.
            loop = asyncio.get_running_loop()
            self._settle_timer = loop.call_later(self._sup.config.grace, self._finalize)
        else:
            self._finalize()

    def on_disconnect(self) -> None:
        self._disconnected = True
        if self._exit_known:
            self._finalize()
        elif self.status is ChildStatus.RUNNING and not self._stopping:
            self.violate(_DROPPED.format(cap=self._limits.max_frame), hard=False)

    def _finalize(self) -> None:
        if self.status is ChildStatus.EXITED:
            return
        self._move(ChildStatus.EXITED)
        for timer in (self._kill_timer, self._settle_timer):
            if timer is not None:
                timer.cancel()
        for task in self._human:
            task.cancel()
        self._sup.forget(self)
        if not self.exited.done():
            try:
                self.exited.set_result(self._exit_status)
            except RuntimeError:  # its event loop is closed: nobody awaits it any more
                pass

    def log_over_cap(self, cap: int) -> None:
        """The state printed more than its log may hold (a sandbox's file size limit): stop it."""
        self._log_cap = cap
        self.kill()

    def violate(self, message: str, *, hard: bool = True) -> None:
        """Record a protocol violation and kill the child."""
        if self._violation is None or (hard and not self._violation_hard):
            self._violation = FailureReason(kind="protocol", message=message)
            self._violation_hard = hard
        self._sup.count_violation(self, message)
        self.kill()

    def on_message(self, msg: Message, fd: int) -> None:
        try:
            self._dispatch(msg, fd)
        except ProtocolError as exc:
            self.violate(str(exc))
        except Exception as exc:  # applying the message failed (e.g. a context hook raised)
            self.violate(f"applying a {msg.TYPE} message failed: {exc!r}")

    def _dispatch(self, msg: Message, fd: int) -> None:
        if isinstance(msg, Hello):
            if self.status is not ChildStatus.LAUNCHING:
                raise ProtocolError("a second hello from the same child")
            self._move(ChildStatus.RUNNING)
            self.fd = fd
            self._sup.bind_fd(self, fd)
            self._sup.launched(self)
            frame, self._run_frame = self._run_frame, None
            if frame is not None:  # else the child got it with its spec
                self._send(frame)
            return
        if self.status is not ChildStatus.RUNNING:
            raise ProtocolError(f"{msg.TYPE} message while the child is {self.status.value}")
        if isinstance(msg, ContextWrite):
            scope = getattr(self.attempt.context, "scope", None)
            if scope is not None and not scope.allows(msg.key):
                raise ProtocolError(f"the state wrote context key {msg.key!r}, outside its context_keys")
            if msg.deleted:
                self.attempt.context.remove_state(msg.key)
            elif msg.value is None:
                raise ProtocolError(f"context_write of {msg.key!r} without a value")
            else:
                self.attempt.context.set_state(msg.key, decode_value(msg.value, self._limits))
        elif isinstance(msg, Result):
            self._result = (decode_value(msg.value, self._limits),)
            self._reported()
        elif isinstance(msg, Error):
            self._error = FailureReason(
                kind="exception",
                message=f"{msg.exception_type.rpartition('.')[2]}: {msg.message}",
                traceback=msg.traceback,
                exception_type=msg.exception_type,
            )
            self._reported()
        elif isinstance(msg, HumanInputRequest):
            task = asyncio.ensure_future(self._answer(msg))
            self._human.add(task)
            task.add_done_callback(self._human.discard)
        elif isinstance(msg, CheckpointSnapshot):
            self.checkpoint_keys = list(msg.keys)
        elif isinstance(msg, Log):
            self._sup.log.info("child_log", pid=self.pid, state=self.attempt.state_name,
                               level=msg.level, message=msg.message)

    def _reported(self) -> None:
        self._move(ChildStatus.REPORTED)
        if self._exit_known:  # its exit was heard before its last frames: nothing more will come
            self._finalize()
            return
        # The child exits right after reporting; one that lingers is killed.
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(self._sup.config.grace, self.kill)

    def _send(self, frame: bytes) -> None:
        try:
            self._sup.router.send(self.secret, frame)
        except ConnectionError as exc:
            self.violate(f"cannot reach the child: {exc}", hard=False)

    async def _answer(self, req: HumanInputRequest) -> None:
        answer: str | None = None
        error_type = error = None
        try:
            answer = await self.attempt.context.human_in_the_loop(
                prompt=req.prompt, timeout=req.timeout, validator=None, default=req.default
            )
            if not isinstance(answer, str):
                answer = str(answer)
        except HumanInputError as exc:
            error_type, error = type(exc).__name__, str(exc)
        except Exception as exc:  # a provider failed: the child raises HumanInputError
            error_type, error = "HumanInputError", f"human input failed: {exc!r}"
        if self.status is ChildStatus.RUNNING:
            self._send(encode_message(HumanInputResponse(
                request_id=req.request_id, answer=answer, error_type=error_type, error=error
            )))

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
        """Ask the child to stop (cancel or preempt), wait ``grace`` seconds, then kill it."""
        self._stopping = True
        if self.status is ChildStatus.RUNNING:
            self._send(encode_message(Preempt(reason=reason) if reason == "preempt" else Cancel(reason=reason)))
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace)
            except TimeoutError:
                pass
        if not self.exited.done():
            self.kill()
            self.confinement.kill()
        await asyncio.shield(self.exited)

    # --- the verdict ----------------------------------------------------------------------

    def outcome(self, status: int | None) -> AttemptOutcome:
        """What the attempt returned, or raise :class:`AttemptFailed` saying why it did not."""
        try:
            usage = self.confinement.usage()
        except Exception as exc:  # usage is a report: never let it hide the outcome
            self._sup.log.warning("usage_unreadable", state=self.attempt.state_name, error=repr(exc))
            usage = {}
        if self._result is not None and not self._violation_hard:  # a child killed for cheating has no result
            return AttemptOutcome(self._result[0], usage)
        raise AttemptFailed(self._failure(status), usage)

    def _failure(self, status: int | None) -> FailureReason:
        exit_code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
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
        if self.denied_calls and (self._error is not None or not self._violation_hard):
            return self._seccomp_reason(exit_code, sig)
        if self._error is not None:
            return self._error
        if self._violation is not None and self._violation_hard:
            return self._violation
        if status is None and self._spawn_error is not None:
            return FailureReason(kind="exit_code", message=f"the state's process could not be started: "
                                 f"{self._spawn_error}")
        if status is None:
            return FailureReason(
                kind="lost_connection",
                message="the zygote that forked this state's process died; the process was killed",
            )
        if self._violation is not None and sig == signal.SIGKILL:
            return self._violation
        tail = self._log_tail()
        if sig is not None:
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            return FailureReason(kind="signal", message=f"the state's process was killed by {name}",
                                 traceback=tail, signal=sig)
        if exit_code == EXIT_SETUP_FAILED and self.fd is not None and self._disconnected:
            # Connected, then dropped before it reported (its next write failed): whether the
            # exit or the disconnect was seen first, the channel is what broke.
            return FailureReason(kind="protocol", traceback=tail,
                                 message=_DROPPED.format(cap=self._limits.max_frame))
        if exit_code == EXIT_SETUP_FAILED:
            return FailureReason(kind="exit_code", exit_code=exit_code, traceback=tail,
                                 message="the state's process could not start (confinement or "
                                 "channel setup failed): see the traceback")
        if exit_code:
            return FailureReason(kind="exit_code", exit_code=exit_code, traceback=tail,
                                 message=f"the state's process exited with code {exit_code} before reporting")
        if self._violation is not None:
            return self._violation
        return FailureReason(kind="lost_connection", traceback=tail, exit_code=0,
                             message="the state's process exited without reporting a result")

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
