"""A request's amounts (resource type -> amount) and the pool's arithmetic over them, on its hot path.

Every grant and release walks each type a request counts (four for a plain CPU and
memory request: CPU, memory, IO and network weight). Compiled (setup.py), a walk is one
call instead of some thirty bytecodes per type. The request is taken untyped: its class
stays interpreted, so that a wrong value gets the project's typed error, not a compiled
attribute's ``TypeError``.
"""

from __future__ import annotations

from typing import Any, Final

from ._types import ResourceType

EPS: Final = 1e-9
"""Slack for float rounding: an amount within it of what is free fits."""

_ALL: Final = ResourceType.ALL
_CPU: Final = ResourceType.CPU
_MEMORY: Final = ResourceType.MEMORY
_IO: Final = ResourceType.IO
_NETWORK: Final = ResourceType.NETWORK
_GPU: Final = ResourceType.GPU


def amounts_of(requirements: Any) -> dict[Any, float]:
    """The accounted amount per resource type of a request (only the types in its ``resource_types``)."""
    types = requirements.resource_types
    out: dict[Any, float] = {}
    every = types is _ALL  # the common case, without Flag membership tests
    value = requirements.cpu_units
    if value and (every or _CPU in types):
        out[_CPU] = float(value)
    value = requirements.memory_mb
    if value and (every or _MEMORY in types):
        out[_MEMORY] = float(value)
    value = requirements.io_weight
    if value and (every or _IO in types):
        out[_IO] = float(value)
    value = requirements.network_weight
    if value and (every or _NETWORK in types):
        out[_NETWORK] = float(value)
    value = requirements.gpu_units
    if value and (every or _GPU in types):
        out[_GPU] = float(value)
    return out


def fits(amounts: dict[Any, float], available: dict[Any, float], reserve: dict[Any, float] | None) -> bool:
    """Whether every amount fits in what is available, less what ``reserve`` sets aside."""
    for rtype, amount in amounts.items():
        room = available[rtype] if reserve is None else available[rtype] - reserve.get(rtype, 0.0)
        if amount > room + EPS:
            return False
    return True


def take(amounts: dict[Any, float], available: dict[Any, float], lowest: dict[Any, float]) -> None:
    """Take ``amounts`` from ``available``, keeping the lowest each type has been at."""
    for rtype, amount in amounts.items():
        left = available[rtype] - amount
        available[rtype] = left
        if left < lowest[rtype]:
            lowest[rtype] = left


def give_back(amounts: dict[Any, float], available: dict[Any, float], totals: dict[Any, float],
              area: dict[Any, float], held: float) -> None:
    """Give ``amounts`` back to ``available`` (never past ``totals``), adding what was held
    for ``held`` seconds to ``area`` (amount x time, for the utilization figures)."""
    for rtype, amount in amounts.items():
        left = available[rtype] + amount
        total = totals[rtype]
        available[rtype] = left if left < total else total
        area[rtype] += amount * held
