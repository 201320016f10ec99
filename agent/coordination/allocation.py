"""Taking coordination primitives from inside a state's code.

``ResourceAllocation(name, amount)`` draws ``amount`` from the QUOTA (or SEMAPHORE)
called ``name`` for the duration of an ``async with`` block; ``mutex(name)`` holds the
MUTEX called ``name`` (created on first use). Both go through the coordinator of the
agent running the state (the process's default one unless the agent was given
another), so the deadlock detector sees them.

The owner defaults to the current state attempt (the coordination hook records it
before the state's code starts, in the attempt's own task), so waits taken inside a
state and the state's own admission are one node of the wait-for graph.

In a child process (``process``, ``worker``, ``sandbox``) the coordinator is the
supervisor's: each take and give-back goes there over the attempt's channel
(:mod:`agent.remote`), so the primitives are the same ones the inline states and the
admission of every agent use, and whatever the attempt still holds when it ends (or is
killed) is given back for it. An unknown name is then reported when the ``async with``
is entered rather than when the object is made.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from types import TracebackType
from typing import Any

from .. import _validate, remote
from ..errors import CoordinationError
from .coordinator import Coordinator, check_coordinator, default_coordinator
from .deadlock import TASK_SEP
from .primitives import Primitive, PrimitiveType
from .primitives.base import check_timeout, check_ttl

_current_owner: contextvars.ContextVar[str | None] = contextvars.ContextVar("coordination_owner", default=None)
_current_coordinator: contextvars.ContextVar[Coordinator | None] = contextvars.ContextVar(
    "coordination_coordinator", default=None
)
# The task the attempt runs in: a task it started (asyncio.gather) takes as an owner of its own.
_owner_task: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar(
    "coordination_owner_task", default=None
)


def attempt_owner(agent: str, run_id: str, state: str, attempt: int) -> str:
    """The owner id of one attempt of a state: what its admission and its code take primitives as."""
    return f"{agent}/{run_id[:8]}/{state}#{attempt}"


def current_owner() -> str | None:
    """The owner id of the state attempt running in this task, if any."""
    return _current_owner.get()


def set_current_owner(owner: str | None, coordinator: Coordinator | None = None) -> None:
    """Record who runs next in this task (and under which coordinator) for the code that follows."""
    _current_owner.set(owner)
    _current_coordinator.set(coordinator)
    _owner_task.set(asyncio.current_task() if owner is not None else None)


def current_coordinator() -> Coordinator:
    """The coordinator of the state attempt running in this task, else the process default."""
    return _current_coordinator.get() or default_coordinator()


def _owner_or_task(owner: str | None) -> str:
    if owner is not None:
        if not isinstance(owner, str) or not owner:
            raise CoordinationError(f"owner must be a non-empty string, got {owner!r}")
        return owner
    found = _current_owner.get()
    task = asyncio.current_task()
    if found is not None:
        # Tasks the state started (asyncio.gather of sections that each take the mutex)
        # take as owners of their own, so they wait for each other as asyncio.Lock would.
        return found if task is _owner_task.get() or task is None else sub_owner(found, id(task))
    if task is None:
        raise CoordinationError("coordination needs a running task, or an explicit owner=")
    return f"task:{task.get_name()}:{id(task):x}"


def sub_owner(owner: str, task: int) -> str:
    """The owner id of a task an attempt started (``task``: a number unique among its live tasks)."""
    return f"{owner}{TASK_SEP}{task:x}"


class _Held:
    """An ``async with`` holding of ``amount`` of one primitive by one owner."""

    def __init__(
        self, coordinator: Coordinator, primitive: Primitive, owner: str, amount: float, timeout: float | None,
    ) -> None:
        # Checked now, not only once it has to wait: a bad timeout fails also where the
        # primitive happens to be free.
        check_timeout(timeout, f"{primitive.type.value} {primitive.name!r}")
        self.coordinator = coordinator
        self.primitive = primitive
        self.owner = owner
        self.amount = amount
        self.timeout = timeout

    async def __aenter__(self) -> "_Held":
        while True:
            primitive = self.primitive
            if not primitive.try_acquire(self.owner, self.amount):  # type: ignore[attr-defined]
                self.coordinator.watch()  # about to wait: make sure deadlocks are looked for
                try:
                    await primitive.acquire(self.owner, self.amount, self.timeout)  # type: ignore[attr-defined]
                except BaseException:
                    self.coordinator.let_go(primitive)  # a grant it could not take was given back
                    raise
            if not primitive.made_on_use or self.coordinator.primitive(primitive.name) is primitive:
                return self
            # Forgotten as free (by another thread's let_go) before this took it: the name's
            # mutex is another one now, which is the one to hold.
            primitive.release(self.owner, self.amount)  # type: ignore[call-arg]
            self.primitive = _mutex_of(self.coordinator, primitive.name, primitive.ttl)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.give_back()

    def give_back(self) -> None:
        """Release what is held (a holding taken away already, by its ttl, is no error)."""
        self.primitive.release(self.owner, self.amount)  # type: ignore[call-arg]
        self.coordinator.let_go(self.primitive)


class _Remote:
    """An ``async with`` holding taken from the supervisor's coordinator, in a child process."""

    def __init__(self, link: remote.CoordinationLink, kind: str, name: str, owner: str | None, amount: float,
                 ttl: float | None, timeout: float | None) -> None:
        if owner is not None and (not isinstance(owner, str) or not owner):
            raise CoordinationError(f"owner must be a non-empty string, got {owner!r}")
        check_timeout(timeout, f"{kind} {name!r}")
        self._link = link
        self._request = (kind, name, owner, amount, ttl, timeout)
        self._holding: int | None = None

    async def __aenter__(self) -> "_Remote":
        self._holding = await self._link.take(*self._request)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        holding, self._holding = self._holding, None
        if holding is not None:
            self._link.give_back(holding)

    def __repr__(self) -> str:
        kind, name, owner, amount = self._request[:4]
        return f"<{kind} {name!r} {amount:g} of the supervisor's coordinator, owner={owner!r}>"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise CoordinationError(f"a primitive needs a non-empty str name, got {name!r}")


def _check_amount(name: str, amount: Any) -> float:
    """``amount`` as a float > 0: the same rule in the supervisor and in a state's child
    (``True`` is no amount, nor is ``"2"``)."""
    if (isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0
            or math.isinf(_validate.finite_float(amount))):
        raise CoordinationError(
            f"ResourceAllocation({name!r}): amount must be a finite number > 0 (the units to draw), "
            f"got {_validate.shown(amount)}"
        )
    return float(amount)


class ResourceAllocation(_Held):
    """``async with ResourceAllocation("shared_resource", 10.0):`` draws 10 units while inside."""

    def __new__(cls, name: str, amount: float = 1.0, *, owner: str | None = None, timeout: float | None = None,
                coordinator: Coordinator | None = None) -> "ResourceAllocation":
        link = remote.link() if coordinator is None else None
        if link is not None:  # in a child: the supervisor's primitive
            _check_name(name)
            return _Remote(link, "allocation", name, owner, _check_amount(name, amount), None,  # type: ignore[return-value]
                           timeout)
        return super().__new__(cls)

    def __init__(
        self,
        name: str,
        amount: float = 1.0,
        *,
        owner: str | None = None,
        timeout: float | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        coord = current_coordinator() if coordinator is None else check_coordinator(coordinator, "ResourceAllocation")
        _check_name(name)
        units = _check_amount(name, amount)
        primitive = coord.require(name, PrimitiveType.QUOTA, PrimitiveType.SEMAPHORE)
        super().__init__(coord, primitive, _owner_or_task(owner), units, timeout)

    def __repr__(self) -> str:
        return f"ResourceAllocation({self.primitive.name!r}, {self.amount:g}, owner={self.owner!r})"


def mutex(
    name: str,
    owner: str | None = None,
    *,
    ttl: float | None = None,
    timeout: float | None = None,
    coordinator: Coordinator | None = None,
) -> _Held | _Remote:
    """``async with mutex("m1"):`` holds the MUTEX ``name`` (made with ``ttl`` when there is
    none, and forgotten once free; a ``ttl`` is checked at every use, though one given
    while the mutex exists does not change it)."""
    check_ttl(ttl, f"mutex({name!r})")
    link = remote.link() if coordinator is None else None
    if link is not None:  # in a child: the supervisor's mutex
        _check_name(name)
        return _Remote(link, "mutex", name, owner, 1.0, ttl, timeout)
    coord = current_coordinator() if coordinator is None else check_coordinator(coordinator, "mutex")
    return _Held(coord, _mutex_of(coord, name, ttl), _owner_or_task(owner), 1.0, timeout)


def _mutex_of(coord: Coordinator, name: str, ttl: float | None) -> Primitive:
    """The MUTEX ``name`` of ``coord``, made (with ``ttl``) when there is none: such a one is
    forgotten once free (:meth:`Coordinator.let_go`), and made again at the next use."""
    primitive = coord.primitive(name)
    if primitive is None:
        primitive = coord.add_primitive(name, PrimitiveType.MUTEX, ttl=ttl)
        primitive.made_on_use = True
    elif primitive.type is not PrimitiveType.MUTEX:
        raise CoordinationError(f"{name!r} is a {primitive.type.name}, not a MUTEX: pick another name")
    return primitive


async def take_for_child(
    kind: str, name: str, owner: str, amount: float, ttl: float | None, timeout: float | None,
) -> _Held:
    """On the supervisor, in the attempt's context: take what a child's state asked for
    (:class:`agent.remote.CoordinationLink`); returns the holding, to ``__aexit__`` later."""
    coord = current_coordinator()
    held: _Held
    if kind == "mutex":
        held = mutex(name, owner, ttl=ttl, timeout=timeout, coordinator=coord)  # type: ignore[assignment]
    elif kind == "allocation":
        held = ResourceAllocation(name, amount, owner=owner, timeout=timeout, coordinator=coord)
    else:
        raise CoordinationError(f"unknown kind of coordination request {kind!r}")
    await held.__aenter__()
    return held
