"""Which running states to evict so that a more important one can start.

The policy only chooses; the scheduler does the evicting (PREEMPT over IPC or task
cancellation, then requeue). Rules, in order:

1. victims come only from *strictly lower* priorities than the request;
2. evict as few holders as possible;
3. among sets of that size, prefer the one whose highest victim priority is lowest
   (then the next highest, and so on);
4. then prefer the most recently started holders (they lose the least work).

When no set of lower-priority holders frees enough, the answer is ``None``: the
request waits like any other. Finding the smallest set is a covering problem; the
policy searches exhaustively up to ``max_combinations`` candidate sets (holders of one
priority that free the same amounts count once per victim slot) and otherwise falls
back to a greedy choice in preference order, pruned of victims it does not need.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from itertools import combinations

from ._ledger import EPS as _EPS  # the pool's slack for float rounding


@dataclass(frozen=True)
class Holder:
    """One running holder as the policy sees it."""

    owner: str
    priority: int
    amounts: Mapping[Any, float]
    started: float
    seq: int = 0  # grant order, breaks ties between equal start times


def eviction_order(holder: Holder) -> tuple[int, float, int]:
    """The sort key of victims: lowest priority first, then most recently started."""
    return (holder.priority, -holder.started, -holder.seq)


def _set_key(chosen: Sequence[Holder]) -> tuple[Any, ...]:
    priorities = tuple(sorted((h.priority for h in chosen), reverse=True))
    recency = tuple(sorted((-h.started, -h.seq) for h in chosen))
    return (len(chosen), priorities, recency)


def _covers(chosen: Iterable[Holder], deficit: Mapping[Any, float]) -> bool:
    for rtype, short in deficit.items():
        if sum(h.amounts.get(rtype, 0.0) for h in chosen) + _EPS < short:
            return False
    return True


@dataclass(frozen=True)
class PreemptionPolicy:
    """Fewest victims, then the lowest priorities, then the most recently started."""

    max_combinations: int = 5_000

    def deficit(self, need: Mapping[Any, float], free: Mapping[Any, float]) -> dict[Hashable, float]:
        """What ``need`` lacks per resource type given ``free``."""
        out = {}
        for rtype, amount in need.items():
            short = amount - free.get(rtype, 0.0)
            if short > _EPS:
                out[rtype] = short
        return out

    def choose(
        self,
        need: Mapping[Any, float],
        free: Mapping[Any, float],
        priority: int,
        holders: Iterable[Holder],
    ) -> list[str] | None:
        """Owners to evict so ``need`` fits; ``[]`` when it fits already; ``None`` when impossible."""
        deficit = self.deficit(need, free)
        if not deficit:
            return []
        candidates = sorted(
            (h for h in holders if h.priority < priority and any(h.amounts.get(r, 0.0) > 0 for r in deficit)),
            key=eviction_order,
        )
        if not _covers(candidates, deficit):
            return None
        smallest = self._lower_bound(candidates, deficit)
        budget = self.max_combinations
        for size in range(smallest, len(candidates) + 1):
            pool = self._representatives(candidates, deficit, size)
            best: tuple[Any, ...] | None = None
            best_set: tuple[Holder, ...] | None = None
            for chosen in combinations(pool, size):
                budget -= 1
                if budget < 0:
                    return self._greedy(candidates, deficit)
                if _covers(chosen, deficit):
                    key = _set_key(chosen)
                    if best is None or key < best:
                        best, best_set = key, chosen
            if best_set is not None:
                return [h.owner for h in sorted(best_set, key=eviction_order)]
        return None  # unreachable: all candidates together cover the deficit

    @staticmethod
    def _representatives(
        candidates: Sequence[Holder], deficit: Mapping[Any, float], size: int
    ) -> list[Holder]:
        # Holders of one priority that free the same amounts are interchangeable, and
        # the more recent is always preferred: a best set of ``size`` victims uses only
        # the ``size`` most preferred of each such class.
        seen: dict[tuple[Any, ...], int] = {}
        out = []
        for holder in candidates:  # already in preference order
            cls = (holder.priority, tuple(holder.amounts.get(r, 0.0) for r in deficit))
            count = seen.get(cls, 0)
            if count < size:
                seen[cls] = count + 1
                out.append(holder)
        return out

    @staticmethod
    def _lower_bound(candidates: Sequence[Holder], deficit: Mapping[Any, float]) -> int:
        # No set smaller than what the largest holders of the scarcest type would need.
        bound = 1
        for rtype, short in deficit.items():
            amounts = sorted((h.amounts.get(rtype, 0.0) for h in candidates), reverse=True)
            total, count = 0.0, 0
            for amount in amounts:
                if total + _EPS >= short:
                    break
                total += amount
                count += 1
            bound = max(bound, count)
        return bound

    @staticmethod
    def _greedy(candidates: Sequence[Holder], deficit: Mapping[Any, float]) -> list[str]:
        chosen: list[Holder] = []
        for holder in candidates:
            if _covers(chosen, deficit):
                break
            chosen.append(holder)
        # Drop victims the others already make up for, least preferred victims first.
        for holder in reversed(list(chosen)):
            rest = [h for h in chosen if h is not holder]
            if _covers(rest, deficit):
                chosen = rest
        return [h.owner for h in chosen]
