"""Taking coordination primitives from inside a state's code.

``ResourceAllocation(name, amount)`` draws ``amount`` from the QUOTA (or SEMAPHORE)
called ``name`` for the duration of an ``async with`` block; ``mutex(name)`` holds the
MUTEX called ``name`` (created on first use). Both go through the coordinator of the
agent running the state (the process's default one unless the agent was given
another), so the deadlock detector sees them.

The owner defaults to the current state attempt (the coordination hook records it
before the state's code starts, in the attempt's own task), so waits taken inside a
state and the state's own admission are one node of the wait-for graph.
"""

from __future__ import annotations

import asyncio
import contextvars
from types import TracebackType

from ..errors import CoordinationError
from .coordinator import Coordinator, default_coordinator
from .primitives import Primitive, PrimitiveType

_current_owner: contextvars.ContextVar[str | None] = contextvars.ContextVar("coordination_owner", default=None)
_current_coordinator: contextvars.ContextVar[Coordinator | None] = contextvars.ContextVar(
    "coordination_coordinator", default=None
)


def current_owner() -> str | None:
    """The owner id of the state attempt running in this task, if any."""
    return _current_owner.get()


def set_current_owner(owner: str | None, coordinator: Coordinator | None = None) -> None:
    """Record who runs next in this task (and under which coordinator) for the code that follows."""
    _current_owner.set(owner)
    _current_coordinator.set(coordinator)


def current_coordinator() -> Coordinator:
    """The coordinator of the state attempt running in this task, else the process default."""
    return _current_coordinator.get() or default_coordinator()


def _owner_or_task(owner: str | None) -> str:
    if owner is not None:
        if not isinstance(owner, str) or not owner:
            raise CoordinationError(f"owner must be a non-empty string, got {owner!r}")
        return owner
    found = _current_owner.get()
    if found is not None:
        return found
    task = asyncio.current_task()
    if task is None:
        raise CoordinationError("coordination needs a running task, or an explicit owner=")
    return f"task:{task.get_name()}:{id(task):x}"


class _Held:
    """An ``async with`` holding of ``amount`` of one primitive by one owner."""

    def __init__(
        self, coordinator: Coordinator, primitive: Primitive, owner: str, amount: float, timeout: float | None,
    ) -> None:
        self.coordinator = coordinator
        self.primitive = primitive
        self.owner = owner
        self.amount = amount
        self.timeout = timeout

    async def __aenter__(self) -> "_Held":
        if not self.primitive.try_acquire(self.owner, self.amount):  # type: ignore[attr-defined]
            self.coordinator.watch()  # about to wait: make sure deadlocks are looked for
            await self.primitive.acquire(self.owner, self.amount, self.timeout)  # type: ignore[attr-defined]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.primitive.release(self.owner, self.amount)  # type: ignore[call-arg]


class ResourceAllocation(_Held):
    """``async with ResourceAllocation("shared_resource", 10.0):`` draws 10 units while inside."""

    def __init__(
        self,
        name: str,
        amount: float = 1.0,
        *,
        owner: str | None = None,
        timeout: float | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        coord = coordinator or current_coordinator()
        primitive = coord.require(name, PrimitiveType.QUOTA, PrimitiveType.SEMAPHORE)
        super().__init__(coord, primitive, _owner_or_task(owner), float(amount), timeout)

    def __repr__(self) -> str:
        return f"ResourceAllocation({self.primitive.name!r}, {self.amount:g}, owner={self.owner!r})"


def mutex(
    name: str,
    owner: str | None = None,
    *,
    ttl: float | None = None,
    timeout: float | None = None,
    coordinator: Coordinator | None = None,
) -> _Held:
    """``async with mutex("m1"):`` holds the MUTEX ``name`` (created with ``ttl`` on first use)."""
    coord = coordinator or current_coordinator()
    primitive = coord.primitive(name)
    if primitive is None:
        primitive = coord.add_primitive(name, PrimitiveType.MUTEX, ttl=ttl)
    elif primitive.type is not PrimitiveType.MUTEX:
        raise CoordinationError(f"{name!r} is a {primitive.type.name}, not a MUTEX: pick another name")
    return _Held(coord, primitive, _owner_or_task(owner), 1.0, timeout)
