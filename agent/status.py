"""Agent and state statuses as explicit state machines.

Each enum has a table of allowed transitions; asking for any other transition is a
bug in the engine and raises :class:`~agent.errors.IllegalTransitionError`.
"""

from __future__ import annotations

import enum

from .errors import IllegalTransitionError


class AgentStatus(str, enum.Enum):
    """Where a whole run stands."""

    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _AGENT_TERMINAL


class StateStatus(str, enum.Enum):
    """Where one state stands in the current run."""

    PENDING = "pending"  # known, not scheduled (or waiting on its dependencies)
    READY = "ready"  # scheduled, waiting for a slot, resources or a retry delay
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"  # can never run in this run (a dependency failed or never came)
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def is_finished(self) -> bool:
        return self in _STATE_FINISHED


_AGENT_TERMINAL = {AgentStatus.COMPLETED, AgentStatus.FAILED, AgentStatus.CANCELLED}
_STATE_FINISHED = {
    StateStatus.COMPLETED,
    StateStatus.FAILED,
    StateStatus.BLOCKED,
    StateStatus.CANCELLED,
    StateStatus.TIMEOUT,
}

_S = StateStatus
STATE_TRANSITIONS: dict[StateStatus, frozenset[StateStatus]] = {
    _S.PENDING: frozenset({_S.READY, _S.BLOCKED, _S.CANCELLED, _S.TIMEOUT, _S.PENDING}),
    _S.READY: frozenset({_S.RUNNING, _S.CANCELLED, _S.BLOCKED, _S.READY, _S.PENDING}),
    _S.RUNNING: frozenset({_S.COMPLETED, _S.FAILED, _S.TIMEOUT, _S.CANCELLED, _S.READY, _S.PENDING}),
    # A finished state may be scheduled again (loops, periodic dependencies, a new run).
    _S.COMPLETED: frozenset({_S.READY, _S.PENDING, _S.BLOCKED, _S.CANCELLED}),
    _S.FAILED: frozenset({_S.READY, _S.PENDING}),
    _S.BLOCKED: frozenset({_S.READY, _S.PENDING}),
    _S.CANCELLED: frozenset({_S.READY, _S.PENDING}),
    _S.TIMEOUT: frozenset({_S.READY, _S.PENDING}),
}

_A = AgentStatus
AGENT_TRANSITIONS: dict[AgentStatus, frozenset[AgentStatus]] = {
    _A.IDLE: frozenset({_A.RUNNING, _A.PAUSED, _A.CANCELLED}),
    _A.RUNNING: frozenset({_A.PAUSED, _A.COMPLETED, _A.FAILED, _A.CANCELLED}),
    _A.PAUSED: frozenset({_A.RUNNING, _A.CANCELLED, _A.FAILED, _A.IDLE}),  # IDLE: a hold before any run let go
    _A.COMPLETED: frozenset({_A.RUNNING, _A.IDLE}),
    _A.FAILED: frozenset({_A.RUNNING, _A.IDLE}),
    _A.CANCELLED: frozenset({_A.RUNNING, _A.IDLE}),
}


for _old, _new in STATE_TRANSITIONS.items():
    # Also on each member, as a tuple: ``new in old._next`` compares by identity first and
    # never hashes an Enum member (a Python-level call), so the hot path stays cheap.
    _old._next = tuple(_new)  # type: ignore[attr-defined]
del _old, _new


def check_state_transition(old: StateStatus, new: StateStatus, state: str) -> None:
    if new not in STATE_TRANSITIONS[old]:
        raise IllegalTransitionError(f"state {state!r}: {old.value} -> {new.value} is not allowed")


for _a_old, _a_new in AGENT_TRANSITIONS.items():
    _a_old._next = tuple(_a_new)  # type: ignore[attr-defined]
del _a_old, _a_new


def check_agent_transition(old: AgentStatus, new: AgentStatus, agent: str) -> None:
    if new is not old and new not in old._next:  # type: ignore[attr-defined]
        raise IllegalTransitionError(f"agent {agent!r}: {old.value} -> {new.value} is not allowed")
