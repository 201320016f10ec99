"""The pool's arithmetic over amounts (resource type -> amount), on its hot path.

Every grant and release walks each type a request counts (four for a plain CPU and
memory request: CPU, memory, IO and network weight). Compiled (setup.py), a walk is one
call instead of some thirty bytecodes per type.
"""

from __future__ import annotations

from typing import Any, Final

EPS: Final = 1e-9
"""Slack for float rounding: an amount within it of what is free fits."""


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
