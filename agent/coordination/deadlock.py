"""Finds owners that wait for each other in a circle, and breaks the circle.

The wait-for graph has an edge ``A -> B`` when owner ``A`` waits on a primitive that
owner ``B`` holds, or when ``A`` was registered as waiting on ``B`` for another reason
(``add_dependency``: a state waiting on another state's result), among the owners that
can never go on: a waiter of a SEMAPHORE or QUOTA goes on once any of its holders gives
back, so a holder that waits for nothing (or for what can go on) frees the others. A
cycle in that graph can never resolve by itself. Resolution fails one waiter of the cycle with
:class:`~agent.errors.DeadlockError` (by default the youngest: the one that started
waiting last, so the work that has waited longest keeps its place); its acquire
raises, its code unwinds and releases what it holds, and the others proceed.

The coordinator runs :meth:`detect_once` every ``detection_interval`` seconds while
anything waits; tests call it directly.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .. import _validate
from ..errors import CoordinationError, DeadlockError
from ..clock import SYSTEM_CLOCK, Clock
from .primitives import Primitive, PrimitiveType


_COUNTING = frozenset({PrimitiveType.SEMAPHORE, PrimitiveType.QUOTA})
TASK_SEP = "/task-"
"""What joins an attempt's owner id and the number of a task it started (allocation.sub_owner)."""
"""Primitives several owners hold at once: a waiter on one goes on once any holder gives
back (what it needs may take more than one; the detector then errs towards no deadlock)."""


def _stuck(needs: dict[str, list[tuple[bool, list[str]]]]) -> set[str]:
    """The owners that can never go on: not those that wait for nothing, nor those whose
    every need (one holder of a counting primitive, every holder of another) can go on."""
    can: set[str] = set()
    changed = True
    while changed:
        changed = False
        for owner, groups in needs.items():
            if owner in can:
                continue
            if all((any if counting else all)(h not in needs or h in can for h in holders)
                   for counting, holders in groups):
                can.add(owner)
                changed = True
    return set(needs) - can


MAX_CYCLES_KEPT = 1_000_000
"""The most ``max_cycles`` may be: each pass looks for that many cycles and keeps them."""


class DeadlockResolution(str, enum.Enum):
    """What the detector does with a cycle it finds."""

    FAIL_YOUNGEST = "fail_youngest"  # the waiter that started waiting last gets DeadlockError
    FAIL_OLDEST = "fail_oldest"
    REPORT = "report"  # count and record the cycle, touch nothing


@dataclass(frozen=True)
class WaitEdge:
    """``waiter`` waits for ``holder`` because of ``resource``."""

    waiter: str
    resource: str
    holder: str
    kind: str  # a PrimitiveType value, or "dependency"
    since: float

    def describe(self) -> str:
        if self.kind == "dependency":
            return f"{self.waiter!r} waits for {self.holder!r} ({self.resource})"
        return f"{self.waiter!r} waits for {self.kind} {self.resource!r} held by {self.holder!r}"


@dataclass(frozen=True)
class DeadlockCycle:
    """One circle of waits, and the waiter failed to break it (if any)."""

    edges: tuple[WaitEdge, ...]
    detected_at: float
    victim: str | None = None

    @property
    def owners(self) -> tuple[str, ...]:
        return tuple(e.waiter for e in self.edges)

    def key(self) -> tuple[tuple[str, str, str], ...]:
        return tuple((e.waiter, e.resource, e.holder) for e in self.edges)

    def describe(self) -> str:
        return ", ".join(e.describe() for e in self.edges)


class DeadlockDetector:
    """Wait-for graph over a coordinator's primitives plus registered dependencies."""

    def __init__(
        self,
        primitives: Callable[[], Iterable[Primitive]],
        *,
        clock: Clock | None = None,
        detection_interval: float = 1.0,
        max_cycles: int = 100,
        resolution: DeadlockResolution = DeadlockResolution.FAIL_YOUNGEST,
    ) -> None:
        self._primitives = primitives
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.detection_interval = detection_interval
        self.max_cycles = max_cycles
        self.resolution = _validate.member(DeadlockResolution, resolution, "resolution", error=CoordinationError)
        self.cycle_count = 0  # distinct cycles seen since the last reset
        self.resolved_count = 0
        self.detections = 0  # passes run
        self._present: set[tuple[tuple[str, str, str], ...]] = set()
        self._dependencies: dict[tuple[str, str], WaitEdge] = {}
        self.history: deque[DeadlockCycle] = deque(maxlen=max(1, max_cycles))

    # --- configuration ----------------------------------------------------------------

    @property
    def detection_interval(self) -> float:
        return self._detection_interval

    @detection_interval.setter
    def detection_interval(self, value: float) -> None:
        self._detection_interval = _validate.number(value, "detection_interval", error=CoordinationError,
                                                    above=True, unit="seconds")  # type: ignore[assignment]

    @property
    def max_cycles(self) -> int:
        """At most this many cycles are looked for per pass and kept in ``history``."""
        return self._max_cycles

    @max_cycles.setter
    def max_cycles(self, value: int) -> None:
        self._max_cycles = _validate.integer(value, "max_cycles", error=CoordinationError, minimum=1,  # type: ignore[assignment]
                                             maximum=MAX_CYCLES_KEPT, why_maximum=" (cycles kept in history)")
        if hasattr(self, "history"):
            self.history = deque(self.history, maxlen=value)

    # --- dependencies that are not primitives -------------------------------------------

    def add_dependency(self, waiter: str, on: str, reason: str = "dependency") -> None:
        """Record that ``waiter`` cannot go on until ``on`` finishes (e.g. a state dependency)."""
        self._dependencies[(waiter, on)] = WaitEdge(waiter, reason, on, "dependency", self.clock.monotonic())

    def remove_dependency(self, waiter: str, on: str) -> None:
        self._dependencies.pop((waiter, on), None)

    # --- detection ------------------------------------------------------------------

    def wait_for_graph(self) -> dict[str, list[WaitEdge]]:
        """Owner -> the edges of what it waits for, right now, among the owners that cannot
        go on (:func:`_stuck`): a cycle through an owner that can is no deadlock."""
        graph: dict[str, list[WaitEdge]] = {}
        needs: dict[str, list[tuple[bool, list[str]]]] = {}  # owner -> (any one will do, of whom)
        for primitive in self._primitives():
            holders = primitive.owners()
            if not holders:
                continue
            counting = primitive.type in _COUNTING
            for waiter in primitive.waiters():
                others = [holder for holder in holders if holder != waiter.owner]
                if not others:
                    continue
                needs.setdefault(waiter.owner, []).append((counting, others))
                graph.setdefault(waiter.owner, []).extend(
                    WaitEdge(waiter.owner, primitive.name, holder, primitive.type.value, waiter.since)
                    for holder in others)
        for edge in self._dependencies.values():
            graph.setdefault(edge.waiter, []).append(edge)
            needs.setdefault(edge.waiter, []).append((False, [edge.holder]))
        # A task an attempt started (asyncio.gather of sections) waits as an owner of its own
        # (``<attempt>/task-<n>``); the attempt that holds something meanwhile waits for it.
        holding = {holder for primitive in self._primitives() for holder in primitive.owners()}
        for waiter in list(needs):
            attempt, sep, _ = waiter.rpartition(TASK_SEP)
            if sep and attempt in holding:
                graph.setdefault(attempt, []).append(
                    WaitEdge(attempt, "a task it started", waiter, "dependency", self.clock.monotonic()))
                needs.setdefault(attempt, []).append((False, [waiter]))
        stuck = _stuck(needs)
        return {waiter: kept for waiter, edges in graph.items() if waiter in stuck
                if (kept := [edge for edge in edges if edge.holder in stuck])}

    def find_cycles(self) -> list[DeadlockCycle]:
        """Elementary cycles of the wait-for graph (at most ``max_cycles``), each once."""
        graph = self.wait_for_graph()
        now = self.clock.monotonic()
        found: list[DeadlockCycle] = []
        for start in sorted(graph):
            path: list[WaitEdge] = []
            on_path = {start}
            stack = [iter(graph[start])]
            while stack:
                edge = next(stack[-1], None)
                if edge is None:
                    stack.pop()
                    if path:
                        on_path.discard(path.pop().holder)
                    continue
                nxt = edge.holder
                if nxt == start:
                    found.append(DeadlockCycle(tuple(path + [edge]), now))
                    if len(found) >= self.max_cycles:
                        return found
                elif nxt > start and nxt not in on_path and nxt in graph:
                    on_path.add(nxt)
                    path.append(edge)
                    stack.append(iter(graph[nxt]))
        return found

    def detect_once(self) -> list[DeadlockCycle]:
        """Find the cycles present now, count the new ones, and resolve them; returns them."""
        self.detections += 1
        cycles = self.find_cycles()
        keys = {c.key() for c in cycles}
        new = keys - self._present
        self.cycle_count += len(new)
        out: list[DeadlockCycle] = []
        failed: set[str] = set()
        primitives = {p.name: p for p in self._primitives()}
        for cycle in cycles:
            victim = None
            if self.resolution is not DeadlockResolution.REPORT and not failed.intersection(cycle.owners):
                victim = self._resolve(cycle, primitives)
                if victim is not None:
                    failed.add(victim)
                    self.resolved_count += 1
            cycle = DeadlockCycle(cycle.edges, cycle.detected_at, victim)
            if cycle.key() in new or victim is not None:
                self.history.append(cycle)
            out.append(cycle)
        # a cycle we broke is gone; one we only reported stays present and is not recounted
        self._present = {c.key() for c in out if c.victim is None}
        return out

    def _resolve(self, cycle: DeadlockCycle, primitives: dict[str, Primitive]) -> str | None:
        candidates = [e for e in cycle.edges if e.kind != "dependency" and e.resource in primitives]
        if not candidates:
            return None
        pick = max if self.resolution is DeadlockResolution.FAIL_YOUNGEST else min
        edge = pick(candidates, key=lambda e: (e.since, e.waiter))
        role = "youngest" if pick is max else "oldest"
        error = DeadlockError(
            f"deadlock: {cycle.describe()}; failing {edge.waiter!r}, the {role} waiter. "
            "Take shared primitives in one fixed order everywhere, or retry the state"
        )
        return edge.waiter if primitives[edge.resource].fail_waiter(edge.waiter, error) else None

    def reset(self) -> None:
        self.cycle_count = 0
        self.resolved_count = 0
        self.detections = 0
        self._present.clear()
        self._dependencies.clear()
        self.history.clear()

    def status(self) -> dict[str, Any]:
        return {
            "cycle_count": self.cycle_count,
            "resolved_count": self.resolved_count,
            "detections": self.detections,
            "detection_interval": self.detection_interval,
            "max_cycles": self.max_cycles,
            "resolution": self.resolution.value,
            "recent_cycles": [
                {"cycle": c.describe(), "owners": list(c.owners), "victim": c.victim, "detected_at": c.detected_at}
                for c in self.history
            ],
        }
