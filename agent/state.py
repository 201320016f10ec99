"""A state as declared (``StateSpec``) and as observed during runs (``StateMetadata``)."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from .dependencies import DependencyConfig
from .errors import FailureReason, InvalidStateFunctionError
from .executor import Isolation
from .resources import Priority, ResourceRequirements
from .retry import RetryPolicy
from .status import StateStatus, check_state_transition

StateResult = Optional[Union[str, List[str]]]
"""What a state returns: the next state's name, a list of names to run in parallel, or None."""

StateFunction = Callable[..., Awaitable[StateResult]]


def check_state_function(name: str, func: Any) -> None:
    """Raise unless ``func`` is ``async def f(context)`` (extra parameters need defaults)."""
    if not callable(func):
        raise InvalidStateFunctionError(f"state {name!r}: {func!r} is not callable")
    target = func
    if not inspect.iscoroutinefunction(target) and not inspect.isfunction(target):
        call = getattr(type(target), "__call__", None)
        if call is not None and inspect.iscoroutinefunction(call):
            target = call.__get__(target)
    if not inspect.iscoroutinefunction(target):
        raise InvalidStateFunctionError(
            f"state {name!r}: {getattr(func, '__name__', func)!r} is not a coroutine function: "
            "define it with `async def name(context: Context) -> StateResult`"
        )
    try:
        inspect.signature(target).bind(object())
    except TypeError:
        raise InvalidStateFunctionError(
            f"state {name!r}: {getattr(func, '__name__', func)!r} must take exactly one positional "
            "argument, the context (further parameters need default values)"
        ) from None
    except ValueError:  # no signature available (some builtins): accept
        pass


@dataclass
class StateSpec:
    """A state as added to an agent."""

    name: str
    func: StateFunction
    dependencies: dict[str, DependencyConfig] = field(default_factory=dict)
    resources: ResourceRequirements | None = None
    retry_policy: RetryPolicy | None = None
    max_retries: int | None = None
    isolation: Isolation | None = None
    timeout: float | None = None
    priority: Priority = Priority.NORMAL
    context_keys: tuple[str, ...] | None = None
    """Keys (and ``"prefix*"`` patterns) the state may read and write; None: see :mod:`agent.scope`."""

    def max_retries_with(self, default_policy: RetryPolicy | None) -> int:
        """Retries after the first attempt: add_state(max_retries), else the state's policy, else the agent's."""
        if self.max_retries is not None:
            return self.max_retries
        policy = self.retry_policy or default_policy
        return policy.max_retries if policy is not None else 0

    @property
    def effective_timeout(self) -> float | None:
        if self.timeout is not None:
            return self.timeout
        return self.resources.timeout if self.resources is not None else None


@dataclass
class AttemptRecord:
    """One finished attempt, kept in ``StateMetadata.history``."""

    number: int
    started_at: float
    ended_at: float
    outcome: str  # completed, failed, timeout, cancelled, preempted
    reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at


@dataclass
class StateMetadata:
    """What the engine knows about one state: status, attempts, timings, usage."""

    name: str
    status: StateStatus = StateStatus.PENDING
    attempts: int = 0  # attempts of the current (or last) activation
    total_attempts: int = 0  # over the agent's lifetime
    max_retries: int = 0
    resources: ResourceRequirements | None = None
    priority: Priority = Priority.NORMAL
    dependencies: dict[str, DependencyConfig] = field(default_factory=dict)
    isolation: Isolation | None = None
    state_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    runs: int = 0  # completed activations in the current run
    preemptions: int = 0
    last_execution: float | None = None
    last_success: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: FailureReason | None = None
    waiting_for: str | None = None  # why a READY/PENDING state is not running
    blocked_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)  # measured use of the last attempt
    history: list[AttemptRecord] = field(default_factory=list)

    HISTORY_LIMIT = 100

    def set_status(self, new: StateStatus) -> None:
        check_state_transition(self.status, new, self.name)
        self.status = new

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def error_message(self) -> str | None:
        return self.error.message if self.error is not None else None

    def record(self, rec: AttemptRecord) -> None:
        self.history.append(rec)
        if len(self.history) > self.HISTORY_LIMIT:
            del self.history[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints and reports."""
        return {
            "name": self.name,
            "status": self.status.value,
            "attempts": self.attempts,
            "total_attempts": self.total_attempts,
            "max_retries": self.max_retries,
            "priority": int(self.priority),
            "state_id": self.state_id,
            "runs": self.runs,
            "preemptions": self.preemptions,
            "last_execution": self.last_execution,
            "last_success": self.last_success,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error.message if self.error else None,
            "error_kind": self.error.kind if self.error else None,
            "blocked_reason": self.blocked_reason,
            "usage": dict(self.usage),
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Take over counters from :meth:`to_dict` output (used when restoring)."""
        self.status = StateStatus(data.get("status", self.status.value))
        for key in ("attempts", "total_attempts", "runs", "preemptions"):
            if isinstance(data.get(key), int):
                setattr(self, key, data[key])
        for key in ("last_execution", "last_success", "started_at", "finished_at"):
            if isinstance(data.get(key), (int, float)):
                setattr(self, key, float(data[key]))
        if data.get("error"):
            self.error = FailureReason(kind=data.get("error_kind") or "exception", message=data["error"])
        self.blocked_reason = data.get("blocked_reason")
        if isinstance(data.get("usage"), dict):
            self.usage = dict(data["usage"])
