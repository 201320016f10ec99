"""The link from a state's code in a child process to its supervisor's coordinator.

``mutex()`` and ``ResourceAllocation`` (:mod:`agent.coordination.allocation`) take a
primitive of the coordinator that admits the state. Inline, that is the caller's own
process. In a child (``process``, ``worker``, ``sandbox``) the coordinator lives in the
supervisor: the child's session registers a :class:`CoordinationLink` here, through
which each take and give-back goes over the attempt's channel, so a MUTEX named
``m1`` excludes every state of every agent the supervisor runs, wherever their code
runs. This module sits between the two sides so that neither imports the other.
"""

from __future__ import annotations

from typing import Protocol


class CoordinationLink(Protocol):
    """How a child takes and gives back its supervisor's primitives."""

    async def take(self, kind: str, name: str, owner: str | None, amount: float, ttl: float | None,
                   timeout: float | None) -> int:
        """Take ``amount`` of primitive ``name`` (``kind``: ``mutex``, made on first use, or
        ``allocation``, of a QUOTA or SEMAPHORE); returns the holding's id. Raises what the
        supervisor raised (a :class:`~agent.errors.CoordinationError`)."""
        ...

    def give_back(self, holding: int) -> None:
        """Give back holding ``holding`` (it is given back anyway when the attempt ends)."""
        ...


_link: CoordinationLink | None = None


def link() -> CoordinationLink | None:
    """The link of this process (None: the coordinator is this process's own)."""
    return _link


def set_link(new: CoordinationLink | None) -> None:
    global _link
    _link = new
