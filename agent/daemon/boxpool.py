"""The box's one admission path: agentd's pool, shared by every job and client of every user.

It is the engine's own admission (:class:`agent.engine.admission.Admission` over a
:class:`~agent.resources.ResourcePool` with this machine's totals, its GPUs and
preemption on), with a :class:`Session` standing in for each remote run: a job's runner
or a plain ``Agent.run()`` with ``AGENT_DAEMON=1``. A session's ``request`` enters the
queue under a box-wide owner name (``job 7/train#3``); grants and preemption orders go
back over its connection. So strict priority, backfill, GPU devices and preemption work
across jobs and users exactly as they do across agents in one process.

Policy, per user (:mod:`agent.daemon.config`): a job's states compete at the job's
priority; a plain client's at their own priority, capped at the user's ceiling. A
user's quota is a pool quota keyed by the user (``user alice``): what all of that
user's running states hold together; a request over it waits (or, if it can never
fit, is refused).

Coordination (DESIGN item 12): each user has a coordinator of their own here
(:class:`UserCoordinator`), whose primitives and rate limits every job and script of
theirs takes through its session (:mod:`agent.coordination.boxwide`); a session that
closes gives back what it held and withdraws its waits and declarations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .._types import Priority, ResourceType
from ..devices import GPUInventory
from ..coordination.coordinator import Coordinator
from ..coordination.primitives import Lease
from ..coordination.ratelimit import RateLimiter
from ..engine.admission import Admission
from ..errors import CoordinationError, CoordinationTimeoutError, DeadlockError, ResourceError
from ..resources import ResourcePool, ResourceRequirements
from .config import DaemonConfig, UserPolicy

Send = Callable[[dict[str, Any]], None]

MAX_TAKES = 10_000
"""The most coordination waits and holdings one connection may have open at once."""
MAX_NAMES = 10_000
"""The most coordinated names agentd keeps for one user."""


class _Request:
    """What the engine's Admission calls an activation: one request of one session."""

    __slots__ = ("number", "owner", "state", "client_state", "priority", "front")

    def __init__(self, number: int, owner: str, user_key: str, state: str, priority: int, front: bool) -> None:
        self.number = number
        self.owner = owner
        self.state = user_key  # the pool's quota key: quotas are per user
        self.client_state = state
        self.priority = priority
        self.front = front


class Session:
    """One connection's requests in the box queue (it plays the engine's ``Run`` for Admission)."""

    def __init__(self, box: "BoxAdmission", label: str, uid: int, user: str, policy: UserPolicy,
                 job_priority: int | None, send: Send, on_devices: Callable[[set[int]], None] | None) -> None:
        self.box = box
        self.label = label
        self.uid = uid
        self.user_key = f"user {user}"
        self.policy = policy
        self.job_priority = job_priority
        self.send = send
        self.on_devices = on_devices
        self.loop: asyncio.AbstractEventLoop | None = None  # agentd's, once Admission asked
        self.requests: dict[int, _Request] = {}
        self.closed = False
        # Box-wide coordination (agent.coordination.boxwide): the names this session
        # declared in its user's coordinator, its waits, and what it holds, by number.
        self.declarer = _Declarer(f"{label} (user {user})")
        self.declared: set[tuple[str, str]] = set()
        self.taking: dict[int, asyncio.Task[None]] = {}
        self.held: dict[int, tuple[Any, str, float]] = {}

    def priority_of(self, asked: int) -> int:
        if self.job_priority is not None:
            return self.job_priority
        return min(int(asked), int(self.policy.priority_ceiling))

    # --- what the client sends ----------------------------------------------------------

    def on_message(self, message: dict[str, Any]) -> bool:
        """Serve an admission or coordination message; False when it is neither.

        A malformed one raises KeyError, TypeError or ValueError (the caller drops the
        connection)."""
        op = message["op"]
        if op == "request":
            self.request(int(message["t"]), str(message["state"]), int(message["priority"]),
                         bool(message.get("front")), dict(message["req"]))
        elif op == "release":
            self.release(int(message["t"]))
        elif op == "requeue":
            self.requeue(int(message["t"]))
        elif op == "coordinate":
            timeout = message.get("timeout")
            self.coordinate(int(message["t"]), str(message["kind"]), message["name"], dict(message["settings"]),
                            _text(message["owner"], "owner"), float(message["amount"]),
                            None if timeout is None else float(timeout), bool(message.get("declared", True)))
        elif op == "uncoordinate":
            self.uncoordinate(int(message["t"]))
        elif op == "renew":
            ttl = message.get("ttl")
            self.renew(int(message["t"]), None if ttl is None else float(ttl))
        else:
            return False
        return True

    def request(self, number: int, state: str, priority: int, front: bool, amounts: dict[str, float]) -> None:
        """Queue a request; its grant (maybe at once), refusal or later preemption is sent back."""
        if number in self.requests:
            self.send({"op": "refused", "t": number, "error": f"request {number} is already queued"})
            return
        try:
            req = requirements(amounts)
        except (ResourceError, TypeError, ValueError) as exc:
            self.send({"op": "refused", "t": number, "error": str(exc)})
            return
        state = state[:200]
        act = _Request(number, f"{self.label}/{state}#{number}", self.user_key, state,
                       self.priority_of(priority), bool(front))
        self.requests[number] = act
        admission = self.box.admission
        try:
            granted = admission.request(self, act, req)  # type: ignore[arg-type]
        except ResourceError as exc:  # larger than the box, or than the user's quota
            del self.requests[number]
            self.send({"op": "refused", "t": number, "error": str(exc)})
            return
        if granted:
            self.on_grant(act)
        else:
            admission.preempt_for(act, req)  # type: ignore[arg-type]

    def release(self, number: int) -> None:
        act = self.requests.pop(number, None)
        if act is not None:
            had_gpus = bool(self.box.pool.devices(act.owner))
            self.box.admission.release(act.owner)
            if had_gpus:
                self._devices_changed()

    def requeue(self, number: int) -> None:
        act = self.requests.get(number)
        if act is not None:
            had_gpus = bool(self.box.pool.devices(act.owner))
            act.front = True
            self.box.admission.requeue(act.owner)
            if had_gpus:
                self._devices_changed()

    def close(self) -> None:
        """The client is gone: give back everything it holds or waits for."""
        self.closed = True
        for number in list(self.requests):
            self.release(number)
        for number in list(self.taking) + list(self.held):
            self.uncoordinate(number)
        coordinator = self.box.coordinators.get(self.uid)
        if coordinator is not None:
            for kind, name in self.declared:
                (coordinator.withdraw_primitive if kind == "primitive" else coordinator.withdraw_rate_limit)(
                    name, self.declarer)
            # What nobody declares or uses any more is dropped (a rate limit is kept: it
            # remembers past starts, which the next job's starts are spaced from).
            coordinator.forget_unused([name for kind, name in self.declared if kind == "primitive"])
        self.box.sessions.discard(self)

    # --- box-wide coordination (agent.coordination.boxwide) -----------------------------

    def coordinate(self, number: int, kind: str, name: str, settings: dict[str, Any], owner: str,
                   amount: float, timeout: float | None, declared: bool = True) -> None:
        """Take ``amount`` of the user's primitive, or a start of their rate limit, named ``name``
        with ``settings`` (which this session then declares, when the client's agent
        ``declared`` them; a name only taken in a state's code is not held to them once
        free); ``coordinated`` or ``coordination_refused`` is sent back once it is decided."""
        if number in self.taking or number in self.held or len(self.taking) + len(self.held) >= MAX_TAKES:
            self.send({"op": "coordination_refused", "t": number,
                       "error": f"request {number} is already open, or more than {MAX_TAKES} are"})
            return
        try:
            thing = self._declare(kind, name, settings, declared)
        except (CoordinationError, KeyError, TypeError, ValueError) as exc:
            self.send({"op": "coordination_refused", "t": number, "error": str(exc)})
            return
        box_owner = f"{self.label}/{owner}"[:300]
        self.taking[number] = asyncio.ensure_future(self._take(number, thing, box_owner, amount, timeout))

    def _declare(self, kind: str, name: str, settings: dict[str, Any], declared: bool) -> Any:
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ValueError(f"a coordinated name must be a str of 1 to 200 characters, got {name!r}")
        coordinator = self.box.coordinator_for(self.uid)
        existing = coordinator.primitive(name) if kind == "primitive" else coordinator.rate_limiter(name)
        if existing is None and coordinator.count() >= MAX_NAMES:
            coordinator.forget_unused()
            known = coordinator.count()
            if known >= MAX_NAMES:
                raise CoordinationError(
                    f"user has {known} coordinated names in agentd, the most it keeps: names stay while a "
                    "running job or script of the user declares or uses them; use fewer names"
                )
        if kind == "primitive":
            if str(settings["type"]).lower() == "barrier":
                raise CoordinationError(f"BARRIER {name!r} counts the arrivals of one run: it is not box-wide")
            thing: Any = coordinator.add_primitive(
                name, str(settings["type"]), ttl=settings["ttl"], max_count=settings["max_count"],
                quota_limit=settings["quota_limit"], wait_timeout=settings["wait_timeout"],
                declarer=self.declarer if declared else None)
        elif kind == "rate":
            thing = coordinator.add_rate_limit(
                name, settings["max_rate"], str(settings["strategy"]), burst_size=settings["burst_size"],
                window_size=settings["window_size"], declarer=self.declarer)
        else:
            raise ValueError(f"unknown kind of coordination {kind!r}: primitive or rate")
        if declared or kind == "rate":
            self.declared.add((kind, name))
        return thing

    async def _take(self, number: int, thing: Any, owner: str, amount: float, timeout: float | None) -> None:
        try:
            if isinstance(thing, RateLimiter):
                await thing.acquire(timeout)
            else:
                if not thing.try_acquire(owner, amount):
                    self.box.coordinators[self.uid].watch()  # about to wait: deadlocks are looked for
                    await thing.acquire(owner, amount, timeout)
                self.held[number] = (thing, owner, amount)
        except CoordinationError as exc:
            kind = ("timeout" if isinstance(exc, CoordinationTimeoutError)
                    else "deadlock" if isinstance(exc, DeadlockError) else "error")
            self.send({"op": "coordination_refused", "t": number, "error": str(exc), "kind": kind})
        else:
            self.send({"op": "coordinated", "t": number})
        finally:
            self.taking.pop(number, None)
            if self.closed and not isinstance(thing, RateLimiter):
                # Given back as the session closed, after close() dropped the names nobody
                # used: a grant won in a race is given back only now, so look again.
                self.box.coordinators[self.uid].forget_unused([thing.name])

    def renew(self, number: int, ttl: float | None) -> None:
        """Renew a LEASE this session holds (nothing when it holds none under ``number``)."""
        held = self.held.get(number)
        if held is not None and isinstance(held[0], Lease):
            try:
                held[0].renew(held[1], ttl)
            except CoordinationError:
                pass  # it expired meanwhile: the holder learns when it renews locally next

    def uncoordinate(self, number: int) -> None:
        """Withdraw a wait, or give back a holding (nothing when neither is open)."""
        task = self.taking.pop(number, None)
        if task is not None:
            task.cancel()
        held = self.held.pop(number, None)
        if held is not None:
            thing, owner, amount = held
            thing.release(owner, amount)
            self.box.coordinators[self.uid].forget_unused([thing.name])  # a name only code takes, now free

    # --- what Admission calls (as it calls a Run) ----------------------------------------

    def on_grant(self, act: _Request) -> None:
        if self.closed or self.requests.get(act.number) is not act:
            return
        assignment = self.box.admission.assignment(act.owner)
        if assignment:
            self._devices_changed()  # the job's devices cgroup opens before the state can start
        self.send({"op": "grant", "t": act.number, "assignment": assignment})

    def preempt(self, act: _Request) -> None:
        if not self.closed and self.requests.get(act.number) is act:
            self.send({"op": "preempt", "t": act.number})

    def _devices_changed(self) -> None:
        if self.on_devices is not None:
            pool = self.box.pool
            self.on_devices({d.minor_number for a in self.requests.values() for d in pool.devices(a.owner)})

    # --- what agentctl shows ---------------------------------------------------------------

    def waiting(self) -> dict[str, str]:
        """Why each queued request of this session waits, by the client's state name."""
        pool = self.box.pool
        return {a.client_state: pool.waiting_reason(a.owner) or "about to be granted"
                for a in self.requests.values() if not pool.holds(a.owner)}

    def holding(self) -> dict[str, dict[str, float]]:
        allocations = self.box.pool.get_state_allocations()
        return {a.client_state: {r.name.lower(): v for r, v in allocations[a.owner].items()}  # type: ignore[union-attr]
                for a in self.requests.values() if a.owner in allocations}


class UserCoordinator(Coordinator):
    """One user's box-wide coordination: every job and script of theirs shares its names."""

    shared_by = "every job and script of the user under agentd"
    declaration_ends = "once that job or script ends"


class _Declarer:
    """A session, as the coordinator names who declared a name (kept weakly there)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __repr__(self) -> str:
        return self.label


class BoxAdmission:
    """agentd's pool and the engine's admission over it (see the module docstring)."""

    def __init__(self, config: DaemonConfig, inventory: GPUInventory | None = None) -> None:
        self.config = config
        self.pool = ResourcePool(
            total_cpu=config.pool_cpu, total_memory=config.pool_memory_mb,
            enable_preemption=config.preemption, enable_quotas=True, gpu_inventory=inventory,
        )
        self.gpus = (inventory.devices() if inventory is not None else [])[: int(self.pool.totals[ResourceType.GPU])]
        self.admission = Admission(self.pool)
        self.sessions: set[Session] = set()
        self._quota_set: set[str] = set()
        self.coordinators: dict[int, UserCoordinator] = {}  # per uid: one user's names never meet another's
        self._users: dict[int, str] = {}

    def coordinator_for(self, uid: int) -> UserCoordinator:
        coordinator = self.coordinators.get(uid)
        if coordinator is None:
            coordinator = self.coordinators[uid] = UserCoordinator()
        return coordinator

    def coordination(self, uid: int | None) -> dict[str, Any]:
        """What each user's coordinator holds and queues (``uid`` None: every user's), by user name."""
        return {self._users.get(u, str(u)): {k: v for k, v in c.get_status().items()
                                              if k in ("primitives", "rate_limiters")}
                for u, c in self.coordinators.items() if uid is None or u == uid}

    def session(self, label: str, uid: int, user: str, policy: UserPolicy, send: Send, *,
                job_priority: int | None = None,
                on_devices: Callable[[set[int]], None] | None = None) -> Session:
        session = Session(self, label, uid, user, policy, job_priority, send, on_devices)
        self._users[uid] = user
        if session.user_key not in self._quota_set and policy.quota:
            quota = policy.quota
            self.pool.set_quota(session.user_key, cpu=quota.get("cpu"), memory=quota.get("memory_mb"),
                                gpu=quota.get("gpu"), mode="wait")
            self._quota_set.add(session.user_key)
        self.sessions.add(session)
        return session

    def info(self) -> dict[str, Any]:
        """The box's totals and GPUs, as agentd tells its clients (a RemotePool is built from it)."""
        t = self.pool.totals
        R = ResourceType
        return {
            "cpu": t[R.CPU], "memory_mb": t[R.MEMORY], "io": t[R.IO], "network": t[R.NETWORK], "gpu": t[R.GPU],
            "gpus": [asdict(d) for d in self.gpus], "preemption": self.pool.enable_preemption,
        }

    def statistics(self) -> dict[str, Any]:
        stats = self.pool.statistics()
        return {
            "totals": {r.name.lower(): v for r, v in stats.totals.items()},  # type: ignore[union-attr]
            "allocated": {r.name.lower(): round(v, 6) for r, v in stats.allocated.items()},  # type: ignore[union-attr]
            "holders": stats.holders,
            "waiting": stats.waiting,
            "waiting_by_priority": {p.name.lower(): n for p, n in stats.waiting_by_priority.items()},
            "granted": stats.granted,
            "preempted": stats.preempted,
            "rejected": stats.rejected,
        }


def requirements(amounts: dict[str, Any]) -> ResourceRequirements:
    """A request as the client's engine accounted it (type name -> amount)."""
    known = {"cpu", "memory", "io", "network", "gpu"}
    if not isinstance(amounts, dict) or set(amounts) - known:
        raise ResourceError(f"a request names unknown resource types: {sorted(set(amounts) - known)}")
    return ResourceRequirements(
        cpu_units=amounts.get("cpu", 0.0), memory_mb=amounts.get("memory", 0.0),
        io_weight=amounts.get("io", 0.0), network_weight=amounts.get("network", 0.0),
        gpu_units=amounts.get("gpu", 0.0), priority=Priority.NORMAL,
    )


def _text(value: Any, what: str) -> str:
    """A str field of a request (``None`` is no owner: it would be held as "None")."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {value!r}")
    return value
