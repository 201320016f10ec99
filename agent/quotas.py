"""Caps on how much of the pool one state, or one priority level, may hold at once.

A quota is a ceiling under the pool's totals: ``set_quota(state="embed", gpu=1)`` keeps
every running instance of ``embed`` (from any run sharing the pool) to one GPU in
total, however much the pool has free. A request that would pass its quota either
fails at once (``mode="fail"``: :class:`~agent.errors.QuotaExceededError`) or waits
until holders under the same quota release (``mode="wait"``). Fail mode is checked
when the request is made; a request already queued for capacity just waits, and so does
one admitted before that asks again (requeued at the front: a preempted holder, or a
grant given back while an admission hook held the attempt up). A request larger than
the quota by itself can never be granted and always fails.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import ResourceRequestError

# Keyword names accepted by ``set_quota`` / ``set_priority_quota``, with the pool type
# names they map to (resolved by the pool, which owns ResourceType).
QUOTA_KEYWORDS = ("cpu", "memory", "io", "network", "gpu")

_EPS = 1e-9


class QuotaMode(str, enum.Enum):
    """What a request that would pass its quota does: fail now, or wait its turn."""

    FAIL = "fail"
    WAIT = "wait"

    @classmethod
    def parse(cls, value: "QuotaMode | str") -> "QuotaMode":
        try:
            return cls(value.value if isinstance(value, QuotaMode) else str(value).lower())
        except ValueError:
            raise ResourceRequestError(f"unknown quota mode {value!r}: use 'fail' or 'wait'") from None


@dataclass(frozen=True)
class Quota:
    """The ceilings for one key, per resource type (types not named are unlimited)."""

    limits: Mapping[Any, float]
    mode: QuotaMode = QuotaMode.WAIT

    def __post_init__(self) -> None:
        for rtype, value in self.limits.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or math.isnan(value):
                raise ResourceRequestError(f"quota for {rtype} must be a number >= 0, got {value!r}")
        object.__setattr__(self, "limits", MappingProxyType(dict(self.limits)))


@dataclass(frozen=True)
class QuotaBreach:
    """Which ceiling a request would pass, and by how much."""

    key: Hashable
    rtype: object
    limit: float
    in_use: float
    requested: float
    mode: QuotaMode

    @property
    def never_fits(self) -> bool:
        """True when the request alone is over the ceiling (waiting cannot help)."""
        return self.requested > self.limit + _EPS


@dataclass
class QuotaBook:
    """Quotas keyed by one thing (a state name or a priority), and what each key holds now.

    Use is tracked for every key, with or without a quota, so a quota set while
    states are running sees what they already hold.
    """

    quotas: dict[Hashable, Quota] = field(default_factory=dict)
    in_use: dict[Hashable, dict[object, float]] = field(default_factory=dict)

    def set(self, key: Hashable, quota: Quota | None) -> None:
        if quota is None:
            self.quotas.pop(key, None)
        else:
            self.quotas[key] = quota

    def breach(self, key: Hashable, amounts: Mapping[Any, float]) -> QuotaBreach | None:
        """The first ceiling of ``key`` that ``amounts`` on top of its current use would pass."""
        quota = self.quotas.get(key)
        if quota is None:
            return None
        used = self.in_use.get(key)
        for rtype, limit in quota.limits.items():
            amount = amounts.get(rtype, 0.0)
            if not amount:
                continue
            held = used.get(rtype, 0.0) if used else 0.0
            if held + amount > limit + _EPS:
                return QuotaBreach(key, rtype, limit, held, amount, quota.mode)
        return None

    def charge(self, key: Hashable, amounts: Mapping[Any, float]) -> None:
        used = self.in_use.get(key)
        if used is None:
            used = self.in_use[key] = {}
        for rtype, amount in amounts.items():
            used[rtype] = used.get(rtype, 0.0) + amount

    def refund(self, key: Hashable, amounts: Mapping[Any, float]) -> None:
        used = self.in_use.get(key)
        if used is None:
            return
        for rtype, amount in amounts.items():
            left = used.get(rtype, 0.0) - amount
            used[rtype] = left if left > _EPS else 0.0
        if not any(used.values()):
            del self.in_use[key]
