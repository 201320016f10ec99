"""agentd's admission, from a client: the pool a job's runner, or any ``Agent.run()`` with
``AGENT_DAEMON=1``, draws from when the box's one pool lives in agentd.

:class:`RemotePool` is a :class:`~agent.resources.ResourcePool` with the box's totals
and GPUs (so ``add_state`` checks requests against the box), whose admission is
:class:`RemoteAdmission`: the engine's admission interface
(:mod:`agent.engine.admission`) over the connection to agentd. A state that declares
resources sends ``request``; agentd queues it in the box's one queue (priorities,
backfill, per-user quotas, preemption across every job and user) and pushes ``grant``
(with the GPUs assigned) or ``preempt`` (the engine stops that state and sends
``requeue``); ``release`` gives a grant back. Every request gets a number of its own,
so a grant that crosses a withdrawal is never taken for a later request. The same
connection serves box-wide coordination (:mod:`agent.coordination.boxwide`):
``coordinate`` takes one of the user's primitives or rate limits in agentd, answered
``coordinated`` or ``coordination_refused``; ``uncoordinate`` gives it back.

Switch: ``AGENT_DAEMON=1`` makes :func:`agent.resources.default_pool` return
:func:`daemon_pool` (agentd's socket from ``AGENT_SOCKET``, else ``/run/agent/agentd.sock``).
Priorities are capped by the user's ceiling in agentd's configuration. If the
connection is lost, every run waiting on or holding a grant fails with
:class:`~agent.errors.DaemonUnavailableError`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..devices import GPUDevice, StaticInventory
from ..errors import (
    CoordinationError, CoordinationTimeoutError, DaemonError, DaemonUnavailableError, DeadlockError,
    QuotaExceededError, ResourceError,
)
from ..resources import ResourcePool, ResourceRequirements
from .protocol import Link, hello, socket_path, version_mismatch

if TYPE_CHECKING:
    from ..engine.run import Activation, Run

DAEMON_ENV = "AGENT_DAEMON"
_QUOTA_FIELDS = {"cpu": "cpu_units", "memory_mb": "memory_mb", "gpu": "gpu_units"}


def encode_requirements(req: ResourceRequirements) -> dict[str, Any]:
    """What agentd needs of a request: the accounted amounts (by type name)."""
    return {rtype.name.lower(): amount for rtype, amount in req.amounts().items()}  # type: ignore[union-attr]


class _Ticket:
    __slots__ = ("number", "run", "act", "link", "assignment", "granted")

    def __init__(self, number: int, run: "Run", act: "Activation", link: Link) -> None:
        self.number = number
        self.run = run
        self.act = act
        self.link = link  # the run's loop's connection: agentd holds the grant for it
        self.assignment: dict[str, Any] = {}
        self.granted = False


class RemoteAdmission:
    """The engine's admission interface (see :class:`agent.engine.admission.Admission`), served by agentd."""

    def __init__(self, pool: "RemotePool") -> None:
        self.pool = pool
        self.tickets: dict[str, _Ticket] = {}  # by the engine's owner key
        self._numbered: dict[int, _Ticket] = {}
        self._numbers = itertools.count(1)
        # coordination asked of agentd, and over which connection
        self._takes: dict[int, tuple[asyncio.Future[None], Link]] = {}
        # coordination agentd holds for this process: its name, what fails its holder's
        # run, and the connection it is held for
        self._holding: dict[int, tuple[str, Callable[[BaseException], None] | None, Link]] = {}

    def owner_for(self, state: str, run_id: str) -> str:
        return state if state not in self.tickets else f"{state}@{run_id[:12]}"

    def request(self, run: "Run", act: "Activation", req: ResourceRequirements) -> bool:
        """Send the request to agentd; the grant arrives later through ``run.on_grant(act)``."""
        self.pool.check_quota(req, act.state)
        link = self.pool.link()
        ticket = _Ticket(next(self._numbers), run, act, link)
        self.tickets[act.owner] = ticket
        self._numbered[ticket.number] = ticket
        link.send({"op": "request", "t": ticket.number, "state": act.state, "priority": act.priority,
                   "front": act.front, "req": encode_requirements(req)})
        return False

    def release(self, owner: str, usage: dict[str, Any] | None = None) -> None:
        ticket = self.tickets.pop(owner, None)
        if ticket is None:
            return
        del self._numbered[ticket.number]
        _send(ticket.link, {"op": "release", "t": ticket.number})

    def requeue(self, owner: str) -> None:
        ticket = self.tickets.get(owner)
        if ticket is not None:
            ticket.assignment = {}
            _send(ticket.link, {"op": "requeue", "t": ticket.number})

    def assignment(self, owner: str) -> dict[str, Any]:
        ticket = self.tickets.get(owner)
        return dict(ticket.assignment) if ticket is not None else {}

    def why_waiting(self, owner: str) -> str:
        return "queued in agentd's box-wide queue (agentctl status shows why)"

    def preempt_for(self, act: "Activation", req: ResourceRequirements) -> bool:
        return False  # agentd preempts, box-wide, when it queues the request

    # --- coordination (agent.coordination.boxwide) --------------------------------------

    async def take(self, kind: str, name: str, settings: dict[str, Any], owner: str, amount: float,
                   timeout: float | None, *, declared: bool = True,
                   on_lost: Callable[[BaseException], None] | None = None) -> tuple[Link, int]:
        """Take ``amount`` of agentd's primitive (``kind`` "primitive") or a start of its rate
        limit ("rate") named ``name``, with ``settings`` (``declared`` by an agent here, or
        only taken by a state's code), for ``owner``; wait for it.

        Returns what :meth:`give_back` takes. Raises what agentd answered: a
        :class:`~agent.errors.CoordinationError` (other settings declared by another job,
        a wait past ``timeout``, a deadlock), or DaemonUnavailableError when the
        connection goes. A wait that is cancelled is withdrawn in agentd. Should the
        connection go while the primitive is held, agentd no longer holds it for this
        process: ``on_lost`` is called then (it fails the holder's run).
        """
        link = self.pool.link()
        number = next(self._numbers)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._takes[number] = (future, link)
        link.send({"op": "coordinate", "t": number, "kind": kind, "name": name, "settings": settings,
                   "owner": owner, "amount": float(amount), "timeout": timeout, "declared": declared})
        try:
            await future
        except BaseException:
            self._takes.pop(number, None)
            if not link.closed:
                link.send({"op": "uncoordinate", "t": number})  # a wait withdrawn, or a grant crossed
            raise
        if kind == "primitive":
            self._holding[number] = (name, on_lost, link)
        return link, number

    def give_back(self, token: tuple[Link, int]) -> None:
        """Give back what :meth:`take` took (nothing to do once its connection is gone)."""
        link, number = token
        self._holding.pop(number, None)
        if not link.closed:
            link.send({"op": "uncoordinate", "t": number})

    @staticmethod
    def renew(token: tuple[Link, int], ttl: float | None) -> None:
        """Renew the LEASE :meth:`take` took, in agentd (for ``ttl`` seconds, or its own ttl)."""
        link, number = token
        if not link.closed:
            link.send({"op": "renew", "t": number, "ttl": ttl})

    def _answer_take(self, message: dict[str, Any]) -> None:
        asked = self._takes.pop(message.get("t"), None)  # type: ignore[arg-type]
        if asked is None or asked[0].done():
            return
        future = asked[0]
        if message["op"] == "coordinated":
            future.set_result(None)
        else:
            error = {"timeout": CoordinationTimeoutError, "deadlock": DeadlockError}.get(
                str(message.get("kind")), CoordinationError)
            future.set_exception(error(f"agentd: {message.get('error') or 'refused'}"))

    # --- what agentd pushes ---------------------------------------------------------

    def on_message(self, message: dict[str, Any]) -> bool:
        """Handle an admission message; False when it is not one."""
        op = message["op"]
        if op in ("coordinated", "coordination_refused"):
            self._answer_take(message)
            return True
        if op not in ("grant", "preempt", "refused"):
            return False
        ticket = self._numbered.get(message.get("t"))  # type: ignore[arg-type]
        if ticket is None:
            return True  # withdrawn meanwhile: agentd has its release
        if op == "grant":
            ticket.granted = True
            ticket.assignment = dict(message.get("assignment") or {})
            ticket.run.on_grant(ticket.act)
        elif op == "preempt":
            ticket.run.preempt(ticket.act)
        else:
            self.tickets.pop(ticket.act.owner, None)
            del self._numbered[ticket.number]
            ticket.run.fail(QuotaExceededError(str(message.get("error") or "agentd refused the request")))
        return True

    def on_lost(self, link: Link, why: str) -> None:
        """``link`` is gone: every run of its loop waiting on or holding a grant fails (the
        runs of other loops, on their own connections, go on)."""
        tickets, takes, holding = self.forget(link)
        for future in takes:
            if not future.done():
                future.set_exception(DaemonUnavailableError(
                    f"lost the connection to agentd ({why}) while waiting for box-wide coordination"))
        for name, fail in holding:  # agentd (a new one) may give it to another job now
            if fail is not None:
                fail(DaemonUnavailableError(
                    f"lost the connection to agentd ({why}) while holding the box-wide {name!r}: it no longer "
                    "excludes the other jobs, so the run that held it fails (resume it once agentd is back)"))
        for ticket in tickets:
            how = "was admitted by it" if ticket.granted else "waited for it to admit it"
            ticket.run.fail(DaemonUnavailableError(
                f"lost the connection to agentd ({why}) while state {ticket.act.state!r} {how}"))

    def forget(self, link: Link) -> tuple[list[_Ticket], list[asyncio.Future[None]],
                                          list[tuple[str, Callable[[BaseException], None] | None]]]:
        """Drop what was asked or held over ``link``; returns it (tickets, takes, holdings)."""
        tickets = [t for t in list(self.tickets.values()) if t.link is link]
        for ticket in tickets:
            self.tickets.pop(ticket.act.owner, None)
            self._numbered.pop(ticket.number, None)
        takes = [(n, future) for n, (future, on) in list(self._takes.items()) if on is link]
        holding = [(n, name, fail) for n, (name, fail, on) in list(self._holding.items()) if on is link]
        for number, _ in takes:
            self._takes.pop(number, None)
        for number, _, _ in holding:
            self._holding.pop(number, None)
        return tickets, [f for _, f in takes], [(name, fail) for _, name, fail in holding]


class RemotePool(ResourcePool):
    """The box's pool as seen from a client: totals and GPUs from agentd, admission by agentd."""

    def __init__(self, welcome: dict[str, Any], connect: Callable[[], socket.socket] | None = None,
                 on_other: Callable[[dict[str, Any]], None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        box = welcome["box"]
        devices = [GPUDevice(**d) for d in box.get("gpus", [])]
        super().__init__(
            total_cpu=box["cpu"], total_memory=box["memory_mb"], total_io=box["io"],
            total_network=box["network"], total_gpu=box["gpu"], enable_preemption=bool(box["preemption"]),
            gpu_inventory=StaticInventory(devices, unavailable_reason="agentd's box has no GPUs"),
        )
        self.user = welcome.get("user")
        self.quota: dict[str, float] = {k: float(v) for k, v in (welcome.get("quota") or {}).items()}
        self.on_other = on_other
        self.on_lost = on_lost
        self._connect = connect
        self._links: dict[asyncio.AbstractEventLoop, Link] = {}  # one connection per event loop
        self._links_lock = threading.Lock()
        self._remote = RemoteAdmission(self)

    def make_admission(self) -> RemoteAdmission:
        """What :meth:`agent.engine.admission.Admission.of` uses for this pool."""
        return self._remote

    def link(self) -> Link:
        """The running loop's connection: one per event loop, so that runs on the loops of
        several threads (``run_sync`` in a thread pool) each keep theirs; agentd gives back
        what a connection held when it closes. A connection whose loop is closed (a
        ``run_sync`` that ended) is closed here, by the next loop that asks."""
        loop = asyncio.get_running_loop()
        with self._links_lock:
            link = self._links.get(loop)
            if link is not None and not link.closed:
                return link
            ended = [(other, old) for other, old in self._links.items() if other.is_closed()]
            for other, old in ended:  # its runs are over: nothing of them to fail
                del self._links[other]
                old.close()
                self._remote.forget(old)
            if self._connect is None:
                raise DaemonUnavailableError("the connection to agentd is gone")
            link = Link(self._connect(), loop, self.dispatch, lambda why: None)
            link.on_lost = functools.partial(self._lost, link)
            self._links[loop] = link
            return link

    def adopt(self, link: Link) -> None:
        """Serve admission over ``link``, an open connection (a job's runner has exactly one)."""
        link.on_message, link.on_lost = self.dispatch, functools.partial(self._lost, link)
        with self._links_lock:
            self._links[link.loop] = link

    def _lost(self, link: Link, why: str) -> None:
        self._remote.on_lost(link, why)
        if self.on_lost is not None:
            self.on_lost(why)

    def dispatch(self, message: dict[str, Any]) -> None:
        if not self._remote.on_message(message) and self.on_other is not None:
            self.on_other(message)

    def check_request(self, requirements: ResourceRequirements, state: str = "?") -> None:
        super().check_request(requirements, state)
        self.check_quota(requirements, state)

    def check_quota(self, requirements: ResourceRequirements, state: str) -> None:
        """Refuse up front what the user's quota in agentd could never admit."""
        for key, attr in _QUOTA_FIELDS.items():
            limit = self.quota.get(key)
            amount = float(getattr(requirements, attr))
            if limit is not None and amount > limit + 1e-9:
                raise QuotaExceededError(
                    f"state {state!r} asks for {attr}={amount:g} but agentd's quota for user "
                    f"{self.user!r} is {key}={limit:g}: lower the request, or ask the operator to raise "
                    "the quota in /etc/agent/agentd.toml"
                )

    # Admission is agentd's: a local grab would bypass the box's queue.
    def try_acquire(self, owner: str, requirements: ResourceRequirements, **_: Any) -> bool:
        return False

    def enqueue(self, *args: Any, **kwargs: Any) -> None:
        raise ResourceError("this pool is agentd's: states are admitted by agentd, not queued here")

    async def acquire(self, *args: Any, **kwargs: Any) -> None:
        raise ResourceError("this pool is agentd's: states are admitted by agentd, not acquired here")


def connect(path: str, role: str = "admission") -> tuple[socket.socket, dict[str, Any]]:
    """A blocking connection to agentd that said hello; returns it and agentd's welcome."""
    from .protocol import BlockingChannel

    channel = BlockingChannel(path)
    try:
        welcome = channel.call(hello(role, pid=os.getpid()))
    except BaseException:
        channel.close()
        raise
    if welcome.get("op") != "welcome":
        channel.close()
        mismatch = version_mismatch(welcome.get("version"), "agentd")
        raise DaemonError(str(welcome.get("error") or mismatch or f"agentd refused the connection: {welcome}"))
    channel.sock.settimeout(None)
    return socket.socket(fileno=channel.sock.detach()), welcome


_lock = threading.Lock()
_pool: RemotePool | None = None


def daemon_pool() -> RemotePool:
    """The process's pool admitted by agentd (``AGENT_DAEMON=1``): one connection per event loop."""
    global _pool
    with _lock:
        if _pool is None:
            path = socket_path()
            try:
                first, welcome = connect(path)
            except DaemonUnavailableError as exc:
                raise DaemonUnavailableError(
                    f"{DAEMON_ENV}=1: {exc}; or unset {DAEMON_ENV} to run without it"
                ) from None
            spare = [first]

            def reconnect() -> socket.socket:
                return spare.pop() if spare else connect(path)[0]

            _pool = RemotePool(welcome, reconnect)
        return _pool


def install(pool: RemotePool) -> None:
    """Make ``pool`` the one :func:`daemon_pool` returns (a job's runner, over its own connection)."""
    global _pool
    with _lock:
        _pool = pool


def _send(link: Link, message: dict[str, Any]) -> None:
    """Send ``message`` over ``link`` unless it is closed (agentd then let go of all it held)."""
    if not link.closed:
        link.send(message)
