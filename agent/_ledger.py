"""A pool's books: what is free, who holds what, and the grant counters.

Every state that declares ``ResourceRequirements`` is granted and released here, so
this is the pool's hot path. :class:`Ledger` decides the common case itself (nothing
queued, no quotas, no GPU devices to pick) and answers "ask the pool" otherwise;
:class:`~agent.resources.ResourcePool` keeps its policy (the wait queue, quotas,
preemption, GPU devices) and shares these dictionaries. Compiled (setup.py), a grant
and its release cost two calls instead of some three hundred bytecodes.
"""

from __future__ import annotations

from typing import Any, Callable

from ._amounts import amounts_of, fits, give_back, take

GRANTED = 1
"""``Ledger.try_take``: the request is granted."""
NO_ROOM = 0
"""``Ledger.try_take``: it does not fit now."""
ASK_POOL = -1
"""``Ledger.try_take``: the pool's full policy decides (something is queued, quotas are on,
GPUs are to be picked, the owner is already known, or the priority is not a plain level)."""


class Holding:
    """What one owner holds (``devices``: the GPUs assigned to it, when the pool has any)."""

    def __init__(self, owner: Any, amounts: dict[Any, float], priority: Any, state: Any, started: float,
                 seq: int) -> None:
        self.owner = owner
        self.amounts = amounts
        self.priority = priority
        self.state = state
        self.started = started
        self.seq = seq
        self.devices: list[Any] = []


class Ledger:
    """A pool's accounting (see the module docstring).

    ``waiters``, ``claims``, ``evicting`` and ``measured`` are the pool's own dictionaries
    (it fills them); the ledger reads them only to know when the common case applies.
    Owners and states are typed loosely: the pool takes any hashable key, and compiled
    code would refuse what its annotation does not name.
    """

    def __init__(self, totals: dict[Any, float], clock: Callable[[], float], levels: tuple[Any, ...],
                 gpu_type: Any, has_gpus: bool, quotas: bool) -> None:
        self.totals = totals
        self.available = dict(totals)
        self.lowest = dict(totals)  # the lowest each type has been at (the peak allocation)
        self.area = dict.fromkeys(totals, 0.0)  # amount x seconds of finished holdings
        self.holders: dict[Any, Holding] = {}
        self.waiters: dict[Any, Any] = {}
        self.claims: dict[Any, Any] = {}
        self.evicting: dict[Any, Any] = {}
        self.measured: dict[Any, Any] = {}
        self.seq = 0
        self.granted = 0
        self.clock = clock
        self.levels = levels  # Priority members by value
        self.gpu_type = gpu_type
        self.has_gpus = has_gpus  # devices to assign: a GPU request takes the pool's path
        self.quotas = quotas

    def try_take(self, owner: Any, requirements: Any, state: Any, priority: Any) -> int:
        """Grant ``requirements`` to ``owner`` now if the common case applies (see :data:`ASK_POOL`)."""
        if self.quotas or self.waiters or owner in self.holders:
            return ASK_POOL
        if priority is None:
            level = requirements.priority
        elif type(priority) is int and 0 <= priority < len(self.levels):
            level = self.levels[priority]
        else:
            return ASK_POOL
        amounts = amounts_of(requirements)
        if self.has_gpus and self.gpu_type in amounts:
            return ASK_POOL
        if not fits(amounts, self.available, None):
            return NO_ROOM
        self.take(owner, amounts, level, state)
        return GRANTED

    def take(self, owner: Any, amounts: dict[Any, float], level: Any, state: Any) -> Holding:
        """Book ``amounts`` as held by ``owner`` (the caller checked that they fit)."""
        take(amounts, self.available, self.lowest)
        self.seq += 1
        holding = Holding(owner, amounts, level, state, self.clock(), self.seq)
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
        """Return ``holding``'s amounts to what is free (it has left ``holders``)."""
        give_back(holding.amounts, self.available, self.totals, self.area, self.clock() - holding.started)
