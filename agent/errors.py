"""Every error the framework raises, in one tree.

``AgentError`` is the root; each subsystem has a branch. Messages say what happened
and what to do about it.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any


def exception_text(exc: BaseException) -> str:
    """``str(exc)`` as :func:`utf8_text`, or a note that it could not be had: a state's
    exception is the state's code, and its ``__str__`` may raise like any other of its methods."""
    try:
        text = str(exc)
    except Exception as inner:  # noqa: BLE001 - whatever it raised, the failure is still reported
        return f"<str() of this {type(exc).__name__} raised {type(inner).__name__}>"
    if not text and type(exc).__name__ == "CancelledError":  # asyncio's, with nothing to say
        return ("the state's code raised it without being stopped (does it await a task it "
                "cancelled?): catch it there, or let that task finish")
    return utf8_text(text)


def traceback_text(exc: BaseException) -> str:
    """``exc``'s formatted traceback, as :func:`utf8_text`."""
    return utf8_text("".join(traceback.format_exception(exc)))


def utf8_text(text: str) -> str:
    """``text`` with each lone surrogate (an undecodable byte, as ``os.listdir`` gives them)
    written out as ``\\udcff``: a failure's text goes to other processes, checkpoints and
    other states as UTF-8, and one such character must not make it fail there instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def exception_type_name(cls: type) -> str:
    """A :class:`FailureReason`'s ``exception_type``: the class's module and qualified name
    (``builtins.ValueError``, ``agent.errors.ContextBudgetError``), the same at every level."""
    return f"{cls.__module__}.{cls.__qualname__}"


MAX_REPORTED_TEXT = 32 * 1024
"""Characters of a failed state's message or traceback that its failure keeps (its error,
its log line), at every level: a state's process may send megabytes of it."""


def reported(text: str, limit: int = MAX_REPORTED_TEXT, *, tail: bool = False) -> str:
    """``text`` another process reported, cut to ``limit`` characters: its start, or with
    ``tail`` its end (a traceback's last lines say where it was raised)."""
    if len(text) <= limit:
        return text
    cut = f"[{len(text) - limit:,} characters cut]"
    return f"{cut}\n{text[-limit:]}" if tail else f"{text[:limit]}... {cut}"


def exception_message(type_name: str, text: str) -> str:
    """``ValueError: bad``, or ``KeyboardInterrupt`` alone for an exception with nothing to say."""
    return f"{type_name}: {text}" if text and text != type_name else type_name


class AgentError(Exception):
    """Raised for any failure the framework itself reports."""


# --- building a workflow -------------------------------------------------------------


class WorkflowDefinitionError(AgentError, ValueError):
    """Raised when a workflow is built wrongly (checked before anything runs)."""


class DuplicateStateError(WorkflowDefinitionError):
    """Raised when a state name is added twice to one agent."""


class InvalidStateFunctionError(WorkflowDefinitionError, TypeError):
    """Raised when a state function is not ``async def f(context)``."""


class UnknownStateError(WorkflowDefinitionError, KeyError):
    """Raised when a name does not refer to a state of the agent."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DependencyCycleError(WorkflowDefinitionError):
    """Raised when declared dependencies form a cycle."""


class InvalidConfigurationError(WorkflowDefinitionError):
    """Raised when a numeric setting is out of range (negative timeout, retries...)."""


# --- running a workflow --------------------------------------------------------------


class ExecutionError(AgentError):
    """Raised when a run cannot continue."""


class InvalidTransitionError(ExecutionError, TypeError):
    """Raised when a state returns something other than a name, a list of names or None."""


class UnknownNextStateError(ExecutionError, KeyError):
    """Raised when a state returns the name of a state the agent does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MaxStepsExceededError(ExecutionError):
    """Raised when a run activates more states than ``Agent(max_steps=...)`` allows."""


class RunTimeoutError(ExecutionError, TimeoutError):
    """Raised when ``run(timeout=...)`` expires before the workflow finishes."""


class AgentBusyError(ExecutionError):
    """Raised when ``run()`` is called while the agent is already running."""


class EventLoopRunningError(ExecutionError, RuntimeError):
    """Raised when ``run_sync()`` is called where an event loop already runs (async code, a
    notebook): ``await agent.run()`` there."""


class IllegalTransitionError(AgentError, RuntimeError):
    """Raised when a status machine is asked for a transition it does not allow (a bug)."""


FAILURE_KINDS: dict[str, str] = {
    "exception": "the state raised (its traceback is kept)",
    "exit_code": "the state's process exited with a non-zero code before reporting",
    "signal": "the state's process was killed by a signal the supervisor did not send "
              "(SIGSEGV, a SIGKILL from outside, ...)",
    "limit": "the kernel enforced a limit: the memory limit killed it (OOM), or the pids limit "
             "refused its forks",
    "timeout": "the attempt ran past its timeout and was stopped",
    "bound": "the process sent more than the supervisor accepts: a frame or value over a bound "
             "(bytes, depth, objects, items, per-attempt totals) or past the run's context budget",
    "protocol": "the process broke the protocol: a malformed frame, another child's identity, "
                "or a lost connection while it kept running",
    "cgroup_escape": "the process left its cgroup, so its limits and usage figures did not hold",
    "lost_connection": "the process exited without reporting, or its zygote died",
    "seccomp": "a sandboxed state died after its seccomp filter refused a system call "
               "(details[\"calls\"] names them)",
}
"""Every kind of :class:`FailureReason`, with what it means: exactly one per failed attempt."""

PERMANENT_KINDS = frozenset({"limit", "bound", "protocol", "cgroup_escape", "seccomp"})
"""Failures the same attempt would meet again: not retried unless the policy asks."""

_PERMANENT_EXCEPTIONS = frozenset(
    {"UnencodableValueError", "ValueTooLargeError", "ContextBudgetError", "ContextScopeError", "UnsendableStateError",
     "InvalidConfigurationError"})


@dataclass(frozen=True)
class FailureReason:
    """Why one attempt of a state failed, as seen by the supervisor.

    ``kind`` is one of :data:`FAILURE_KINDS`. ``permanent`` says whether trying again
    could help: a kernel limit, a bound, a protocol violation, a cgroup escape, a value
    the model cannot carry, a context key outside the state's ``context_keys`` or a setting
    the supervisor cannot use (``InvalidConfigurationError``) fails the same way every time, so
    :class:`~agent.retry.RetryPolicy` does not retry it unless ``retry_permanent=True``.
    A sandboxed state that failed after its seccomp filter refused a system call has kind
    ``seccomp`` (``details["calls"]`` names them).
    ``exception_type`` names the exception's class as :func:`exception_type_name` does
    (``builtins.ValueError``).
    """

    kind: str
    message: str
    traceback: str = ""
    exit_code: int | None = None
    signal: int | None = None
    exception_type: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def permanent(self) -> bool:
        if self.details.get("retryable"):  # e.g. a memory kill a worker's earlier states may explain
            return False
        if self.kind in PERMANENT_KINDS:
            return True
        return self.kind == "exception" and (self.exception_type or "").rpartition(".")[2] in _PERMANENT_EXCEPTIONS

    def __str__(self) -> str:
        return self.message


class StateFailedError(ExecutionError):
    """Raised by ``run()`` when a state failed permanently (its retries are exhausted).

    Carries the state name, the number of attempts, the failure reason and the
    traceback text of the last attempt (the child's, for isolated states).
    """

    def __init__(self, state: str, attempts: int, reason: FailureReason, *, retry_permanent: bool = False) -> None:
        self.state = state
        self.attempts = attempts
        self.reason = reason
        self.traceback = reason.traceback
        noun = "attempt" if attempts == 1 else "attempts"
        text = f"state {state!r} failed after {attempts} {noun}: {reason.message}"
        if reason.permanent and not retry_permanent:  # (with it, the retries ran out)
            text += " [a permanent failure: retried only with RetryPolicy(retry_permanent=True)]"
        if reason.traceback:
            text += "\n--- traceback of the last attempt ---\n" + reason.traceback.rstrip()
        super().__init__(text)


class StateTimeoutError(StateFailedError):
    """Raised by ``run()`` when a state's last attempt ran past its timeout."""


class DependencyTimeoutError(ExecutionError, TimeoutError):
    """Raised by ``run()`` when a state waited on its dependencies past ``DependencyConfig.timeout``."""


# --- context ---------------------------------------------------------------------------


class ContextError(AgentError):
    """Raised for misuse of the run's context."""


class ContextTypeError(ContextError, TypeError):
    """Raised when typed context data has the wrong type or a field of the wrong type."""


class ContextKeyError(ContextError, KeyError):
    """Raised when typed data is read or updated under a key that holds none."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ContextScopeError(ContextKeyError):
    """Raised when a state reads or writes a context key outside its ``context_keys``."""


class UnencodableValueError(ContextError, TypeError):
    """Raised when a value is outside the value model (:mod:`agent.values`): it cannot be
    stored in the context, in any isolation level."""


class ValueTooLargeError(UnencodableValueError):
    """Raised when a value is larger than one message between processes may carry, or holds
    more objects or container elements than the model allows."""


class ContextBudgetError(ContextError):
    """Raised when a write would take the run's context past its byte budget
    (``Agent(context_budget_mb=...)``)."""


# --- resources -------------------------------------------------------------------------


class ResourceError(AgentError):
    """Raised for resource requests and the resource pool."""


class ResourceRequestError(ResourceError, ValueError):
    """Raised when a resource request can never be met (larger than the pool, bad values)."""


class QuotaExceededError(ResourceError):
    """Raised when a request would pass a configured quota and the quota is set to fail."""


class GPUUnavailableError(ResourceRequestError):
    """Raised when a state asks for GPUs this machine does not have."""


# --- isolation -------------------------------------------------------------------------


class IsolationError(AgentError):
    """Raised when an isolated state cannot be launched or supervised."""


class UnsendableStateError(IsolationError):
    """Raised when a state's function (or a value its code uses) cannot be copied into the
    process that would run it: permanent, it would fail the same way again."""


class IsolationUnavailableError(IsolationError):
    """Raised when the requested isolation level cannot be provided on this machine."""


class RayUnavailableError(IsolationUnavailableError):
    """Raised when ``isolation="ray"`` is asked for but Ray is not installed or not reachable."""


class RayCapacityError(IsolationUnavailableError):
    """Raised when no node of the Ray cluster can hold what a state asks for."""


class CgroupError(IsolationError):
    """Raised when a cgroup cannot be created, limited, joined or removed."""


class ProtocolError(IsolationError):
    """Raised when a message across the process boundary is malformed or not allowed."""


class BoundExceededError(ProtocolError):
    """Raised when data from another process passes a decoding bound (bytes, depth,
    objects, items per container, per-attempt totals)."""


class AttemptLogNotFoundError(IsolationError, LookupError):
    """Raised when no log file is kept for the requested run, state and attempt."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --- checkpoints and human input ---------------------------------------------------------


class CheckpointError(AgentError):
    """Raised when a checkpoint cannot be written, read or applied."""


class HumanInputError(AgentError):
    """Raised when human input cannot be obtained."""


class HumanInputTimeoutError(HumanInputError, TimeoutError):
    """Raised when nobody answered a human-input request in time and there is no default."""


# --- coordination ----------------------------------------------------------------------


class CoordinationError(AgentError):
    """Raised by coordination primitives and rate limiters."""


class CoordinationTimeoutError(CoordinationError, TimeoutError):
    """Raised when waiting on a coordination primitive timed out."""


class DeadlockError(CoordinationError):
    """Raised in a waiter chosen to break a detected deadlock."""


# --- monitoring ------------------------------------------------------------------------


class MonitorError(AgentError):
    """Raised by the metrics, live view and exporters."""


class MonitorConfigurationError(MonitorError, ValueError):
    """Raised when a monitor is configured wrongly (bad interval, metric types, callback)."""


class StatusEndpointError(MonitorError):
    """Raised when a status endpoint cannot be reached, refuses a client, or answers wrongly."""


# --- agentd ----------------------------------------------------------------------------


class DaemonError(AgentError):
    """Raised by agentd, the box-wide service, and by its clients (agentctl, remote admission)."""


class DaemonUnavailableError(DaemonError, ConnectionError):
    """Raised when agentd cannot be reached, or the connection to it was lost."""


class DaemonProtocolError(DaemonError):
    """Raised when a message to or from agentd is malformed, or its protocol version differs."""


class DaemonConfigError(DaemonError, ValueError):
    """Raised when agentd's configuration file is malformed or names unknown users or groups."""


class JobError(DaemonError):
    """Raised when agentd refuses a request about a job (unknown, not the caller's, wrong status)."""


class JobNotFoundError(JobError, LookupError):
    """Raised when agentd has no job (or state, or question) of that id."""


class JobAccessError(JobError, PermissionError):
    """Raised when a user asks about, or steers, a job of another user."""
