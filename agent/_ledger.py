"""A pool's books: what is free, who holds what, and the grant counters.

Every state that declares ``ResourceRequirements`` is granted and released here, so
this is the pool's hot path. :class:`Ledger` decides the common case itself (nothing
queued, no quotas, no GPU devices to pick) and answers "ask the pool" otherwise;
:class:`~agent.resources.ResourcePool` keeps its policy (the wait queue, quotas,
preemption, GPU devices).

Compiled (setup.py), the books are plain floats, one per resource type: a grant and its
release touch no dictionary and allocate no number (a plain request's grant and release:
about 0.6 µs, against 2.6 over dictionaries of boxed floats).
Amounts reach the rest of the pool as dictionaries (resource type -> amount, only the
types a request counts), made when asked for. Requests, owners and states are typed
loosely: ``ResourceRequirements`` stays interpreted (a wrong value gets the project's
typed error, not a compiled attribute's ``TypeError``), and the pool takes any hashable
owner.
"""

from __future__ import annotations

from typing import Any, Callable, Final

from ._types import ResourceType

EPS: Final = 1e-9
"""Slack for float rounding: an amount within it of what is free fits."""

GRANTED: Final = 1
"""``Ledger.try_take``: the request is granted."""
NO_ROOM: Final = 0
"""``Ledger.try_take``: it does not fit now."""
ASK_POOL: Final = -1
"""``Ledger.try_take``: the pool's full policy decides (something is queued, quotas are on,
GPUs are to be picked, the owner is already known, the request counts only some types,
or the priority is not a plain level)."""

_ALL: Final = ResourceType.ALL
_CPU: Final = ResourceType.CPU
_MEMORY: Final = ResourceType.MEMORY
_IO: Final = ResourceType.IO
_NETWORK: Final = ResourceType.NETWORK
_GPU: Final = ResourceType.GPU


_FIELDS: Final = (("cpu_units", _CPU), ("memory_mb", _MEMORY), ("io_weight", _IO), ("network_weight", _NETWORK),
                  ("gpu_units", _GPU))


def amounts_of(requirements: Any) -> dict[Any, float]:
    """The accounted amount per resource type of a request (only the types in its
    ``resource_types``, and only those it asks for)."""
    types = requirements.resource_types
    every = types is _ALL  # the common case, without Flag membership tests
    out: dict[Any, float] = {}
    for name, rtype in _FIELDS:
        value = getattr(requirements, name)
        if value and (every or rtype in types):
            out[rtype] = float(value)
    return out


class Amounts:
    """One amount per resource type, as plain floats (0 for a type not counted)."""

    def __init__(self, cpu: float, memory: float, io: float, network: float, gpu: float) -> None:
        self.cpu = cpu
        self.memory = memory
        self.io = io
        self.network = network
        self.gpu = gpu

    @staticmethod
    def of(amounts: dict[Any, float]) -> Amounts:
        return Amounts(amounts.get(_CPU, 0.0), amounts.get(_MEMORY, 0.0), amounts.get(_IO, 0.0),
                       amounts.get(_NETWORK, 0.0), amounts.get(_GPU, 0.0))

    def get(self, rtype: Any) -> float:
        if rtype is _CPU:
            return self.cpu
        if rtype is _MEMORY:
            return self.memory
        if rtype is _IO:
            return self.io
        if rtype is _NETWORK:
            return self.network
        return self.gpu

    def as_dict(self) -> dict[Any, float]:
        """Every type, as the pool's totals list them."""
        return {_CPU: self.cpu, _MEMORY: self.memory, _IO: self.io, _NETWORK: self.network, _GPU: self.gpu}


class Holding:
    """What one owner holds (``devices``: the GPUs assigned to it, when the pool has any)."""

    def __init__(self, owner: Any, held: Amounts, amounts: dict[Any, float] | None, priority: Any, state: Any,
                 started: float, seq: int) -> None:
        self.owner = owner
        self.held = held
        self._amounts = amounts
        self.priority = priority
        self.state = state
        self.started = started
        self.seq = seq
        self.devices: list[Any] = []

    @property
    def amounts(self) -> dict[Any, float]:
        """What it holds per resource type (only the types it holds some of)."""
        amounts = self._amounts
        if amounts is None:
            amounts = {rtype: amount for rtype, amount in self.held.as_dict().items() if amount}
            self._amounts = amounts
        return amounts


class Ledger:
    """A pool's accounting (see the module docstring).

    ``waiters``, ``claims``, ``evicting`` and ``measured`` are the pool's own dictionaries
    (it fills them); the ledger reads them only to know when the common case applies.
    """

    def __init__(self, totals: dict[Any, float], clock: Callable[[], float], levels: tuple[Any, ...],
                 has_gpus: bool, quotas: bool) -> None:
        self.total = Amounts.of(totals)
        self.free = Amounts.of(totals)
        self.lowest = Amounts.of(totals)  # the lowest each type has been at (the peak allocation)
        self.area = Amounts(0.0, 0.0, 0.0, 0.0, 0.0)  # amount x seconds of finished holdings
        self.holders: dict[Any, Holding] = {}
        self.waiters: dict[Any, Any] = {}
        self.claims: dict[Any, Any] = {}
        self.evicting: dict[Any, Any] = {}
        self.measured: dict[Any, Any] = {}
        self.seq = 0
        self.granted = 0
        self.clock = clock
        self.levels = levels  # Priority members by value
        self.has_gpus = has_gpus  # devices to assign: a GPU request takes the pool's path
        self.quotas = quotas

    def fits(self, amounts: dict[Any, float], reserve: dict[Any, float] | None) -> bool:
        """Whether every amount fits in what is free, less what ``reserve`` sets aside (none
        of a type asked for fits whatever is set aside: it can delay nobody)."""
        free = self.free
        for rtype, amount in amounts.items():
            room = free.get(rtype) if reserve is None else free.get(rtype) - reserve.get(rtype, 0.0)
            if amount > EPS and amount > room + EPS:
                return False
        return True

    def try_take(self, owner: Any, requirements: Any, state: Any, priority: Any) -> int:
        """Grant ``requirements`` to ``owner`` now if the common case applies (see :data:`ASK_POOL`)."""
        if self.quotas or self.waiters or owner in self.holders or requirements.resource_types is not _ALL:
            return ASK_POOL
        if priority is None:
            level = requirements.priority
        elif type(priority) is int and 0 <= priority < len(self.levels):
            level = self.levels[priority]
        else:
            return ASK_POOL
        cpu: float = float(requirements.cpu_units)
        memory: float = float(requirements.memory_mb)
        io: float = float(requirements.io_weight)
        network: float = float(requirements.network_weight)
        gpu: float = float(requirements.gpu_units)
        if gpu and self.has_gpus:
            return ASK_POOL
        free = self.free
        if (cpu > free.cpu + EPS or memory > free.memory + EPS or io > free.io + EPS
                or network > free.network + EPS or gpu > free.gpu + EPS):
            return NO_ROOM
        self._book(owner, Amounts(cpu, memory, io, network, gpu), None, level, state)
        return GRANTED

    def take(self, owner: Any, amounts: dict[Any, float], level: Any, state: Any) -> Holding:
        """Book ``amounts`` as held by ``owner`` (the caller checked that they fit)."""
        return self._book(owner, Amounts.of(amounts), amounts, level, state)

    def _book(self, owner: Any, held: Amounts, amounts: dict[Any, float] | None, level: Any, state: Any) -> Holding:
        free, lowest = self.free, self.lowest
        free.cpu -= held.cpu
        free.memory -= held.memory
        free.io -= held.io
        free.network -= held.network
        free.gpu -= held.gpu
        if free.cpu < lowest.cpu:
            lowest.cpu = free.cpu
        if free.memory < lowest.memory:
            lowest.memory = free.memory
        if free.io < lowest.io:
            lowest.io = free.io
        if free.network < lowest.network:
            lowest.network = free.network
        if free.gpu < lowest.gpu:
            lowest.gpu = free.gpu
        self.seq += 1
        holding = Holding(owner, held, amounts, level, state, self.clock(), self.seq)
        self.holders[owner] = holding
        self.granted += 1
        if self.claims:
            self.claims.pop(owner, None)
        return holding

    def try_release(self, owner: Any) -> bool:
        """Give back what ``owner`` holds if nothing else has to happen with it (nothing
        queued to settle, no quota to refund, no eviction, measure or GPU to account);
        False leaves it to the pool."""
        if self.waiters or self.quotas or self.evicting or self.measured:
            return False
        holding = self.holders.get(owner)
        if holding is None or holding.devices:
            return False
        del self.holders[owner]
        self.give_back(holding)
        return True

    def give_back(self, holding: Holding) -> None:
        """Return ``holding``'s amounts to what is free (never past the totals); it has
        left ``holders``. What it held for how long adds to ``area``."""
        held, free, total, area = holding.held, self.free, self.total, self.area
        seconds = self.clock() - holding.started
        free.cpu = _at_most(free.cpu + held.cpu, total.cpu)
        free.memory = _at_most(free.memory + held.memory, total.memory)
        free.io = _at_most(free.io + held.io, total.io)
        free.network = _at_most(free.network + held.network, total.network)
        free.gpu = _at_most(free.gpu + held.gpu, total.gpu)
        area.cpu += held.cpu * seconds
        area.memory += held.memory * seconds
        area.io += held.io * seconds
        area.network += held.network * seconds
        area.gpu += held.gpu * seconds


def _at_most(value: float, limit: float) -> float:
    return value if value < limit else limit
