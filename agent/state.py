"""A state as observed during runs (``StateMetadata``), and what a state returns (``StateResult``)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, List, Optional, Union

from ._types import Priority
from .dependencies import DependencyConfig
from .errors import FailureReason
from .executor import Isolation
from .status import StateStatus, check_state_transition

if TYPE_CHECKING:
    from .resources import ResourceRequirements

StateResult = Optional[Union[str, List[str]]]
"""What a state returns: the next state's name, a list of names to run in parallel, or None."""

StateFunction = Callable[..., Awaitable[StateResult]]


@dataclass(slots=True, init=False)
class AttemptRecord:
    """One finished attempt, kept in ``StateMetadata.history``."""

    number: int
    started_at: float
    ended_at: float
    outcome: str  # completed, failed, timeout, cancelled, preempted
    reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)

    # Written out rather than generated: compiled (setup.py), one made per attempt is native code.
    def __init__(self, number: int, started_at: float, ended_at: float, outcome: str,
                 reason: str | None = None, usage: dict[str, Any] | None = None) -> None:
        self.number = number
        self.started_at = started_at
        self.ended_at = ended_at
        self.outcome = outcome
        self.reason = reason
        self.usage = {} if usage is None else usage

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling and copying: compiled (setup.py), the class cannot be made without its
        # constructor's arguments, so it says how to make it again.
        return (AttemptRecord, (self.number, self.started_at, self.ended_at, self.outcome, self.reason, self.usage))


HISTORY_LIMIT: Final = 100
"""How many attempts ``StateMetadata.history`` keeps (the newest)."""

_id_prefix: Final = os.urandom(4).hex() + "-"  # unique per process; the counter within it
_ids: Final = itertools.count(1)
_PENDING: Final = StateStatus.PENDING  # a member read from its class goes through the enum's metaclass


@dataclass(init=False, eq=False)
class StateMetadata:
    """What the engine knows about one state: status, attempts, timings, usage.

    The constructor sets every field, in the order declared: each instance's attribute
    dict then keeps the layout it shares with every other, and a run's writes replace
    values in it. A field first set during a run would add a key, and Python would give
    that state its own, larger dict (some 450 bytes more per state, allocated as it runs).
    """

    name: str
    status: StateStatus = StateStatus.PENDING
    attempts: int = 0  # attempts of the current (or last) activation
    total_attempts: int = 0  # over the agent's lifetime
    max_retries: int = 0
    resources: "ResourceRequirements | None" = None
    priority: Priority = Priority.NORMAL
    dependencies: dict[str, DependencyConfig] = field(default_factory=dict)
    isolation: Isolation | None = None
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
    history: list[AttemptRecord] = field(default_factory=list)  # the newest HISTORY_LIMIT attempts

    def __init__(
        self,
        name: str,
        max_retries: int = 0,
        resources: "ResourceRequirements | None" = None,
        priority: Priority = Priority.NORMAL,
        dependencies: dict[str, DependencyConfig] | None = None,
        isolation: Isolation | None = None,
    ) -> None:
        self.name = name
        self.status = _PENDING
        self.attempts = 0
        self.total_attempts = 0
        self.max_retries = max_retries
        self.resources = resources
        self.priority = priority
        self.dependencies = {} if dependencies is None else dependencies
        self.isolation = isolation
        self._number = 0  # its state_id's, taken when first asked for (one per state cost a run 3%)
        self.runs = 0
        self.preemptions = 0
        self.last_execution = None
        self.last_success = None
        self.started_at = None
        self.finished_at = None
        self.error = None
        self.waiting_for = None
        self.blocked_reason = None
        self.usage = {}
        self.history = []

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling and copying (see AttemptRecord.__reduce__): made again from its fields.
        kept = {f.name: getattr(self, f.name) for f in fields(self)}
        kept["_number"] = self._numbered()  # a copy has the same state_id
        return (_restored_metadata, (self.name, kept))

    @property
    def state_id(self) -> str:
        """Unique in this process: a prefix of the process's own, then a counter."""
        return f"{_id_prefix}{self._numbered()}"

    def _numbered(self) -> int:
        if not self._number:
            self._number = next(_ids)
        return self._number

    def set_status(self, new: StateStatus) -> None:
        if new not in self.status._next:  # type: ignore[attr-defined]
            check_state_transition(self.status, new, self.name)  # raises, naming the transition
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
        """Keep ``rec``; only the newest ``HISTORY_LIMIT`` attempts are kept."""
        history = self.history
        history.append(rec)
        if len(history) > HISTORY_LIMIT:
            del history[0]

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


def _restored_metadata(name: str, values: dict[str, Any]) -> StateMetadata:
    meta = StateMetadata(name)
    for key, value in values.items():
        setattr(meta, key, value)
    return meta
