"""One admission path per pool: every run that shares a ``ResourcePool`` waits in its one queue.

A state that declares ``ResourceRequirements`` is admitted here and nowhere else. Its
request joins the pool's queue (strict priority across every agent sharing the pool,
first come first served within a priority, backfill only into what blocked higher
requests leave, quotas; see :class:`~agent.resources.ResourcePool`). When a release
anywhere makes room, the pool grants in that order and this module wakes the run
that owns the request, whichever agent it belongs to. With preemption enabled, a
request that does not fit may evict running states of strictly lower priority from
any run sharing the pool (DESIGN.md items 10 and 14); the victims are requeued at the
front of their level. Grants of ``gpu_units`` carry concrete GPUs, which the attempt
takes to its executor and gives back with its release.

Runs on several threads (each with its event loop: ``run_sync`` in a thread pool, a
threaded web server) may share a pool: every step is taken under the pool's lock, and a
grant or an eviction for a run on another thread's loop is handed to that loop, which
acts on it only if the request is still the same one.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Protocol

from .._ledger import ASK_POOL, Ledger
from .._loops import call_in
from ..devices import assignment

if TYPE_CHECKING:
    from ..resources import ResourcePool, ResourceRequirements
    from .run import Activation, Run


class Admitter(Protocol):
    """What a run asks of its pool's admission: :class:`Admission`, or agentd's
    (:class:`agent.daemon.remote.RemoteAdmission`)."""

    def owner_for(self, state: str, run_id: str) -> str: ...
    def request(self, run: "Run", act: "Activation", req: "ResourceRequirements") -> bool: ...
    def release(self, owner: str, usage: dict[str, Any] | None = None) -> None: ...
    def requeue(self, owner: str) -> None: ...
    def assignment(self, owner: str) -> dict[str, list[Any]]: ...
    def why_waiting(self, owner: str) -> str: ...
    def preempt_for(self, act: "Activation", req: "ResourceRequirements") -> bool: ...


class Ticket:
    """A request of one activation of one run, while it waits or holds.

    ``run`` and ``act`` are typed loosely: besides the engine's ``Run`` and
    ``Activation``, agentd's sessions and their requests play them
    (:mod:`agent.daemon.boxpool`), and compiled code would check them by class. A run
    has ``on_grant(act)``, ``preempt(act)`` and ``loop`` (None until its first request
    notes the event loop it runs on); an activation ``owner``, ``state``, ``priority``
    (an int) and ``front``.
    """

    def __init__(self, run: Any, act: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        self.run = run
        self.act = act
        self.loop = loop  # the run's: where its grant and eviction are handled
        self.req: Any = None  # what it asks for (ResourceRequirements)
        self.requesting = False  # inside request(): a grant now is returned, not notified
        self.granted_now = False


class Admission:
    """The engine's side of one pool's queue (see the module docstring)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # a ResourcePool (typed loosely: compiled, its check would be by class)
        self.ledger: Ledger = pool._ledger
        self.tickets: dict[str, Ticket] = {}
        self.lock: threading.RLock = pool.lock
        self._preempt_due: set[asyncio.AbstractEventLoop] = set()  # loops where _preempt_again is scheduled

    @staticmethod
    def of(pool: "ResourcePool") -> Admitter:
        """The admission of ``pool`` (one per pool, made on first use).

        A pool admitted elsewhere brings its own (``make_admission``): agentd's
        (:class:`agent.daemon.remote.RemotePool`) sends requests to the box's queue.
        """
        admission: Admitter | None = getattr(pool, "_admission", None)
        if admission is None:
            make = getattr(pool, "make_admission", None)
            admission = make() if make is not None else Admission(pool)
            pool._admission = admission  # type: ignore[attr-defined]
        return admission

    def owner_for(self, state: str, run_id: str) -> str:
        """The pool key for ``state`` of run ``run_id``: the plain name unless another run uses it."""
        ledger = self.ledger
        if state not in self.tickets and state not in ledger.holders and state not in ledger.waiters:
            return state
        return f"{state}@{run_id[:12]}"

    def request(self, run: Any, act: Any, req: Any) -> bool:
        """Queue ``act``'s request; True when it is granted at once.

        Otherwise ``run.on_grant(act)`` is called when the pool grants it. Raises what
        the pool raises for a request that can never be granted (a quota in fail mode).
        """
        owner = act.owner
        pool = self.pool
        loop = run.loop  # asking asyncio costs a system call (its check of the process id)
        if loop is None:
            loop = run.loop = asyncio._get_running_loop()
        ticket = Ticket(run, act, loop)
        ticket.req = req
        lock = self.lock  # the pool's: its steps are taken here without taking it again
        lock.acquire()  # not ``with``: compiled, its two method lookups cost more than the work
        try:
            self.tickets[owner] = ticket
            try:
                quick = self.ledger.try_take(owner, req, act.state, act.priority)
                if quick != ASK_POOL:
                    if quick:
                        return True
                elif pool._acquire_by_policy(owner, req, act.state, act.priority, act.front):
                    return True
                ticket.requesting = True
                pool.enqueue(owner, req, act.priority, state=act.state, front=act.front, notify=self._granted)
            except BaseException:
                self.tickets.pop(owner, None)
                raise
            ticket.requesting = False
            return ticket.granted_now
        finally:
            lock.release()

    def _granted(self, owner: str) -> None:
        ticket = self.tickets.get(owner)
        if ticket is None:  # withdrawn while the pool settled: give it back
            self.pool.release(owner)
        elif ticket.requesting:
            ticket.granted_now = True
        else:
            self._on_its_loop(owner, ticket, self._granted_there)

    def _granted_there(self, owner: str, ticket: Ticket) -> None:
        with self.lock:
            if self.tickets.get(owner) is ticket:  # else released meanwhile, its grant with it
                ticket.run.on_grant(ticket.act)

    def _on_its_loop(self, owner: str, ticket: Ticket, handler: Any) -> None:
        """``handler(owner, ticket)`` on the loop of the ticket's run: now when it is this
        thread's (:func:`~agent._loops.call_in`). A run whose loop is closed is over: its
        grant is given back."""
        if ticket.loop is None:
            handler(owner, ticket)
        elif not call_in(ticket.loop, handler, owner, ticket) and self.tickets.pop(owner, None) is ticket:
            self.pool.release(owner)

    def requeue(self, owner: str) -> None:
        """A preempted holder gives its grant back and waits again at the front of its level."""
        with self.lock:
            if owner in self.tickets and self.pool.holds(owner):
                self.pool.requeue(owner, notify=self._granted)

    def release(self, owner: str, usage: dict[str, Any] | None = None) -> None:
        """The activation is done with its grant, or withdraws its queued request."""
        lock = self.lock
        lock.acquire()
        try:
            if self.tickets.pop(owner, None) is None:
                return
            pool = self.pool
            if usage:
                pool.record_measured(owner, usage)
            if pool._lent:
                pool._lent.pop(owner, None)  # a loan still waiting ends with nothing to add
            if not self.ledger.try_release(owner):
                held = owner in self.ledger.holders
                pool._release_by_policy(owner)
                if held and pool.enable_preemption:
                    self._preempt_again_soon()
            if pool._loans:  # a state answered by a human takes its CPU back (take_cpu_back)
                pool._grant_loans()
        finally:
            lock.release()

    def _preempt_again_soon(self) -> None:
        """After a holder released: a request still waiting may evict now what it could not
        when it came (holders of its own level or above were in its way, and one went).
        Looked at on the waiting request's own event loop, on its next turn: after what
        released has finished its step (a run withdrawing its requests one by one, a batch
        of grants being launched), and whatever the releasing loop does next."""
        due = self._preempt_due
        if len(due) > 8:  # loops that closed before they looked never will
            due.difference_update([loop for loop in due if loop.is_closed()])
        for owner in self.pool.blocked_heads():
            ticket = self.tickets.get(owner)
            if ticket is None or ticket.req is None:
                continue
            loop = ticket.loop
            if loop is None:
                self.preempt_for(ticket.act, ticket.req)
            elif loop not in due:
                try:
                    loop.call_soon_threadsafe(self._preempt_again, loop)
                except RuntimeError:  # closed: its run is over
                    continue
                due.add(loop)

    def _preempt_again(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            self._preempt_due.discard(loop)
            for owner in self.pool.blocked_heads():
                ticket = self.tickets.get(owner)
                if (ticket is not None and ticket.loop is loop and ticket.req is not None
                        and not getattr(ticket.run, "done", False)):
                    self.preempt_for(ticket.act, ticket.req)

    def assignment(self, owner: str) -> dict[str, list[Any]]:
        """What the attempt carries to its executor: the GPUs granted to ``owner`` (empty when none)."""
        devices = self.pool.devices(owner)
        return assignment(devices) if devices else {}

    def why_waiting(self, owner: str) -> str:
        """The pool's reason why ``owner`` still waits."""
        return self.pool.waiting_reason(owner) or "resources"

    def preempt_for(self, act: Any, req: Any) -> bool:
        """Evict strictly lower-priority holders of any run so that ``act`` fits; True when some were."""
        pool = self.pool
        if not pool.enable_preemption:
            return False
        with self.lock:
            tickets = self.tickets
            # Holders are few (the pool's capacity bounds them); tickets also count every waiter.
            among = [owner for owner in self.ledger.holders if owner != act.owner and owner in tickets]
            victims = pool.find_victims(act.owner, req, act.priority, among=among, state=act.state) or []
            for victim in victims:
                self._on_its_loop(victim, tickets[victim], self._evicted_there)
            return bool(victims)

    def _evicted_there(self, owner: str, ticket: Ticket) -> None:
        with self.lock:
            if self.tickets.get(owner) is ticket:
                ticket.run.preempt(ticket.act)
