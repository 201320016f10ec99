"""The coordinator: primitives and rate limits by name, one per process by default.

DESIGN item 12: coordination is keyed by the name of the state it guards and shared by
every agent of the process, so a MUTEX on ``database_write`` holds across concurrent
runs and across isolated processes (admission happens in the supervisor, which is
this process). :func:`default_coordinator` is that one instance; tests and embedders
may build their own (with a :class:`~agent.clock.FakeClock`).

Who configured a name is remembered: each agent that declares a primitive or a rate
limit (``add_state_coordination`` / ``add_state_rate_limit``) is kept, weakly, as a
declarer of that name. Declaring the same settings again shares the one object; other
settings for a name that another live agent still declares are refused with a
:class:`CoordinationError` (its MUTEX would silently become something else under its
runs). A declaration stops counting when its agent withdraws it
(``remove_state_coordination`` / ``remove_state_rate_limit``) or is garbage-collected;
before refusing, the coordinator runs the garbage collector once, so agents that
nothing references any more (reference cycles included) do not count.

While anything waits on a primitive, a background task runs the deadlock detector
every ``detection_interval`` seconds and, every ``cleanup_interval`` seconds, takes
expired holdings away; it stops by itself when nothing waits or is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import weakref
from typing import Any

from .. import _env, _validate
from ..errors import CoordinationError
from ..clock import SYSTEM_CLOCK, Clock
from .deadlock import DeadlockDetector, DeadlockResolution
from .primitives import Primitive, PrimitiveType, create_primitive, primitive_type_of
from .ratelimit import RateLimiter, RateLimitStrategy, create_rate_limiter, strategy_of


class Coordinator:
    """Holds named primitives and rate limiters, and watches them for deadlocks."""

    shared_by = "every agent of the coordinator"
    """Who shares one name's primitive (said when other settings are refused)."""
    declaration_ends = "once its agent calls {remove} or is garbage-collected"
    """When a declaration stops counting (said when other settings are refused)."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        detection_interval: float = 1.0,
        max_cycles: int = 100,
        cleanup_interval: float = 60.0,
        resolution: DeadlockResolution = DeadlockResolution.FAIL_YOUNGEST,
    ) -> None:
        if clock is not None:
            _validate.methods(clock, "Coordinator(clock=...)", ("monotonic", "sleep"), error=CoordinationError,
                              expected="a Clock (monotonic() and sleep(), e.g. agent.clock.FakeClock()) or None "
                                       "for the system clock")
        self.clock: Clock = clock or SYSTEM_CLOCK
        self._primitives: dict[str, Primitive] = {}
        self._rate_limiters: dict[str, RateLimiter] = {}
        # (kind, name) -> the agents whose declaration the shared object carries, held weakly
        self._declarers: dict[tuple[str, str], weakref.WeakSet[Any]] = {}
        self._config_lock = threading.RLock()
        self.deadlock_detector = DeadlockDetector(
            lambda: [p for _, p in self._primitive_items()],
            clock=self.clock,
            detection_interval=detection_interval,
            max_cycles=max_cycles,
            resolution=resolution,
        )
        self.cleanup_interval = cleanup_interval
        self._task: asyncio.Task[None] | None = None
        self._last_cleanup = self.clock.monotonic()

    @property
    def cleanup_interval(self) -> float:
        return self._cleanup_interval

    @cleanup_interval.setter
    def cleanup_interval(self, value: float) -> None:
        self._cleanup_interval = _validate.number(value, "cleanup_interval", error=CoordinationError,  # type: ignore[assignment]
                                                  above=True, unit="seconds")

    # --- configuration ----------------------------------------------------------------

    def add_primitive(
        self,
        name: str,
        primitive_type: PrimitiveType | str,
        *,
        ttl: float | None = None,
        max_count: int | None = None,
        quota_limit: float | None = None,
        wait_timeout: float | None = None,
        declarer: Any = None,
    ) -> Primitive:
        """The primitive named ``name``, created on first use.

        Configuring a name again with the same settings returns the existing primitive
        (every agent of the coordinator shares it) and records ``declarer`` (an agent,
        kept weakly) as one more declarer of it. Other settings are refused while
        another live declarer still declares the name, and while anybody holds or waits
        for the primitive; otherwise the primitive is replaced.
        """
        fresh = self._new_primitive(name, {
            "type": primitive_type_of(primitive_type).value, "ttl": ttl, "max_count": max_count,
            "quota_limit": quota_limit, "wait_timeout": wait_timeout,
        })
        with self._config_lock:
            current = self._primitives.get(name)
            declarers = self._declarers.setdefault(("primitive", name), weakref.WeakSet())
            if current is not None:
                if self._same_or_refused(current, fresh, "primitive", name, declarers, declarer):
                    return current
                if current.owners() or current.waiters():
                    raise CoordinationError(
                        f"{name!r} is already coordinated as {describe_primitive(current.config())} and in use "
                        f"(owners {current.owners()}); it cannot become {describe_primitive(fresh.config())} now: "
                        "configure it the same way everywhere, or use another name"
                    )
            self._primitives[name] = fresh
            _declare_alone(declarers, declarer)
            return fresh

    def _same_or_refused(self, current: Any, fresh: Any, kind: str, name: str, declarers: Any, declarer: Any) -> bool:
        """True when ``fresh`` has ``current``'s settings (``declarer`` then declares it too);
        raises when another live agent declares ``current``; False when it may be replaced."""
        if current.config() == fresh.config():
            if declarer is not None:
                declarers.add(declarer)
            return True
        others = _live_others(declarers, declarer)
        if others:
            describe, remover = ((describe_primitive, "remove_state_coordination") if kind == "primitive"
                                 else (describe_rate_limit, "remove_state_rate_limit"))
            raise CoordinationError(_conflict(
                kind, name, describe(current.config()), others, describe(fresh.config()), declarer,
                self.shared_by, self.declaration_ends.format(remove=f"{remover}({name!r})"),
            ))
        return False

    def _new_primitive(self, name: str, settings: dict[str, Any]) -> Primitive:
        """A primitive of ``settings`` (``type``, ``ttl``, ``max_count``, ``quota_limit``, ``wait_timeout``)."""
        return create_primitive(name, settings["type"], ttl=settings["ttl"], max_count=settings["max_count"],
                                quota_limit=settings["quota_limit"], wait_timeout=settings["wait_timeout"],
                                clock=self.clock)

    def _new_rate_limiter(self, name: str, settings: dict[str, Any]) -> RateLimiter:
        """A rate limiter of ``settings`` (``max_rate``, ``strategy``, ``burst_size``, ``window_size``)."""
        return create_rate_limiter(name, settings["max_rate"], settings["strategy"], burst_size=settings["burst_size"],
                                   window_size=settings["window_size"], clock=self.clock)

    def primitive(self, name: str) -> Primitive | None:
        return self._primitives.get(name)

    def require(self, name: str, *types: PrimitiveType) -> Primitive:
        """The primitive ``name``; raise when there is none (or not of one of ``types``)."""
        primitive = self._primitives.get(name)
        if primitive is None:
            known = ", ".join(sorted(self._primitives)) or "none"
            raise CoordinationError(
                f"no coordination primitive named {name!r} (known: {known}): "
                "add it first with add_state_coordination()/add_primitive()"
            )
        if types and primitive.type not in types:
            wanted = " or ".join(t.name for t in types)
            raise CoordinationError(f"{name!r} is a {primitive.type.name}, not a {wanted}")
        return primitive

    def remove_primitive(self, name: str) -> None:
        with self._config_lock:
            primitive = self._primitives.pop(name, None)
            self._declarers.pop(("primitive", name), None)
        if primitive is not None:
            primitive.reset()

    def withdraw_primitive(self, name: str, declarer: Any) -> None:
        """``declarer`` no longer declares the primitive ``name`` (which stays, for its other users)."""
        with self._config_lock:
            declarers = self._declarers.get(("primitive", name))
            if declarers is not None:
                declarers.discard(declarer)

    def count(self) -> int:
        """How many names it keeps (primitives and rate limits)."""
        return len(self._primitives) + len(self._rate_limiters)

    def declared(self, kind: str, name: str) -> bool:
        """Whether an agent declares ``name`` (``kind``: "primitive" or "rate limit")."""
        return bool(list(self._declarers.get((kind, name), ())))

    def forget_unused(self, names: list[str] | None = None) -> int:
        """Remove the primitives of ``names`` (default: all) that nobody declares, holds or
        waits for: nothing is lost, and a later use makes them afresh. Returns how many."""
        with self._config_lock:
            gone = [name for name in (self._primitives if names is None else names)
                    if (p := self._primitives.get(name)) is not None and not p.owners() and not p.waiters()
                    and not self.declared("primitive", name)]
            for name in gone:
                del self._primitives[name]
                self._declarers.pop(("primitive", name), None)
        return len(gone)

    def let_go(self, primitive: Primitive) -> None:
        """A holding of ``primitive`` ended: forget it if ``mutex()`` made it on first use and
        nobody declares, holds or waits for it now. A name made from data
        (``mutex(f"user-{uid}")``) would otherwise be kept for the life of the process."""
        if primitive.made_on_use:
            with self._config_lock:
                if self._primitives.get(primitive.name) is primitive:
                    self.forget_unused([primitive.name])

    def add_rate_limit(
        self,
        name: str,
        max_rate: float,
        strategy: RateLimitStrategy | str = RateLimitStrategy.TOKEN_BUCKET,
        *,
        burst_size: int | float | None = None,
        window_size: float = 1.0,
        declarer: Any = None,
    ) -> RateLimiter:
        """The rate limiter named ``name``, as :meth:`add_primitive` does for primitives.

        The same settings share the existing limiter; other settings are refused while
        another live declarer still declares the name, and while anybody waits on it;
        otherwise the limiter is replaced (and starts afresh).
        """
        fresh = self._new_rate_limiter(name, {
            "max_rate": max_rate, "strategy": strategy_of(strategy).value, "burst_size": burst_size,
            "window_size": window_size,
        })
        with self._config_lock:
            current = self._rate_limiters.get(name)
            declarers = self._declarers.setdefault(("rate limit", name), weakref.WeakSet())
            if current is not None:
                if self._same_or_refused(current, fresh, "rate limit", name, declarers, declarer):
                    return current
                waiting = current.statistics().waiting
                if waiting:
                    raise CoordinationError(
                        f"{name!r} is already rate limited as {describe_rate_limit(current.config())} and "
                        f"{waiting} wait on it; it cannot become {describe_rate_limit(fresh.config())} now: "
                        "configure it the same way everywhere, or use another name"
                    )
            self._rate_limiters[name] = fresh
            _declare_alone(declarers, declarer)
            return fresh

    def rate_limiter(self, name: str) -> RateLimiter | None:
        return self._rate_limiters.get(name)

    def remove_rate_limit(self, name: str) -> None:
        with self._config_lock:
            self._rate_limiters.pop(name, None)
            self._declarers.pop(("rate limit", name), None)

    def withdraw_rate_limit(self, name: str, declarer: Any) -> None:
        """``declarer`` no longer declares the rate limit ``name`` (which stays, for its other users)."""
        with self._config_lock:
            declarers = self._declarers.get(("rate limit", name))
            if declarers is not None:
                declarers.discard(declarer)

    # --- background watch -------------------------------------------------------------

    def watch(self) -> None:
        """Make sure the deadlock/cleanup task runs on the current loop (no-op outside one)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._task = loop.create_task(self._watch(), name="agent.coordination watch")

    @property
    def watching(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _watch(self) -> None:
        clock, detector = self.clock, self.deadlock_detector
        while self._busy():
            await clock.sleep(detector.detection_interval)
            detector.detect_once()
            if clock.monotonic() - self._last_cleanup >= self.cleanup_interval:
                self.cleanup()

    def _busy(self) -> bool:
        return any(p.waiters() for _, p in self._primitive_items())

    def cleanup(self) -> int:
        """Take away holdings past their ttl; returns how many."""
        self._last_cleanup = self.clock.monotonic()
        return sum(p.expire_stale() for _, p in self._primitive_items())

    async def aclose(self) -> None:
        """Stop the background task (it also stops by itself when nothing waits)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- status and reset -------------------------------------------------------------

    def get_status(self) -> dict[str, Any]:
        """``{"primitives": {name: {...}}, "rate_limiters": {...}, "deadlock_detector": {...}}``."""
        return {
            "primitives": {name: p.status() for name, p in self._primitive_items()},
            "rate_limiters": {name: _plain(r.status()) for name, r in self._limiter_items()},
            "deadlock_detector": {**self.deadlock_detector.status(), "running": self.watching},
            "cleanup_interval": self.cleanup_interval,
        }

    def reset(self, names: list[str] | None = None) -> None:
        """Release every holding and fail every waiter of ``names`` (default: everything).

        Rate limiters of those names forget past starts. A full reset also clears the
        deadlock detector's counts.
        """
        for name, primitive in self._primitive_items():
            if names is None or name in names:
                primitive.reset()
        for name, limiter in self._limiter_items():
            if names is None or name in names:
                limiter.reset()
        if names is None:
            self.deadlock_detector.reset()

    def _primitive_items(self) -> list[tuple[str, Primitive]]:
        """The primitives now, copied under the lock: agents are declared from other threads
        while a loop walks them (status, reset, the watch)."""
        with self._config_lock:
            return list(self._primitives.items())

    def _limiter_items(self) -> list[tuple[str, RateLimiter]]:
        with self._config_lock:
            return list(self._rate_limiters.items())

    def __repr__(self) -> str:
        return f"<Coordinator primitives={sorted(self._primitives)} rate_limiters={sorted(self._rate_limiters)}>"


def _live_others(declarers: weakref.WeakSet[Any], declarer: Any) -> list[Any]:
    """The live declarers other than ``declarer``; garbage is collected first when there are any.

    An agent that nothing references any more may still sit in a reference cycle (an
    agent and its hooks refer to each other) until the collector runs: it must not keep
    a name's settings fixed, so a conflict is only reported after one collection.
    """
    if not any(d is not declarer for d in list(declarers)):
        return []
    gc.collect()
    return [d for d in list(declarers) if d is not declarer]


def _declare_alone(declarers: weakref.WeakSet[Any], declarer: Any) -> None:
    """A new object for the name: only ``declarer`` (if any) declares it now."""
    declarers.clear()
    if declarer is not None:
        declarers.add(declarer)


def _who(declarer: Any) -> str:
    if declarer is None:
        return "a direct Coordinator call"
    name = getattr(declarer, "name", None)
    return f"agent {name!r}" if isinstance(name, str) else repr(declarer)


def _conflict(
    what: str, name: str, current: str, others: list[Any], wanted: str, declarer: Any, shared_by: str, ends: str,
) -> str:
    holders = ", ".join(sorted({_who(d) for d in others}))
    return (
        f"state {name!r} already has the {what} {current}, declared by {holders} (still alive), so "
        f"{_who(declarer)} cannot make it {wanted}: one {what} per state name is shared by {shared_by}. "
        f"Use another state name, or the same settings ({current}); a declaration stops counting {ends}"
    )


def describe_primitive(config: dict[str, Any]) -> str:
    """``MUTEX(ttl=30)``, ``SEMAPHORE(max_count=3)``, ``QUOTA(quota_limit=16, ttl=3600)``: a primitive's settings."""
    kind = config["type"]
    parts = []
    if kind in (PrimitiveType.SEMAPHORE, PrimitiveType.BARRIER):
        parts.append(f"max_count={config.get('max_count', config.get('capacity')):g}")
    elif kind is PrimitiveType.QUOTA:
        parts.append(f"quota_limit={config['capacity']:g}")
    for key in ("ttl", "wait_timeout"):
        if config.get(key) is not None:
            parts.append(f"{key}={config[key]:g}")
    return f"{kind.name}({', '.join(parts)})"


def describe_rate_limit(config: dict[str, Any]) -> str:
    """``TOKEN_BUCKET(max_rate=10, burst_size=5)``, ``SLIDING_WINDOW(max_rate=100, window_size=60)``."""
    parts = [f"{key}={config[key]:g}" for key in ("max_rate", "burst_size", "window_size") if key in config]
    return f"{config['strategy'].name}({', '.join(parts)})"


def _plain(status: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, RateLimitStrategy) else v) for k, v in status.items()}


_default: Coordinator | None = None
_box: Coordinator | None = None
_defaults_lock = threading.Lock()


def check_coordinator(value: Any, what: str) -> Coordinator:
    """``value`` when it is a :class:`Coordinator` (``what``: the call, for the message)."""
    if not isinstance(value, Coordinator):
        raise CoordinationError(
            f"{what}(coordinator=...) must be a Coordinator (agent.coordination.Coordinator()), or None for "
            f"the process's default one, got {_validate.shown(value)}"
        )
    return value


def default_coordinator() -> Coordinator:
    """The process-wide coordinator every agent shares (DESIGN item 12).

    With ``AGENT_DAEMON=1`` (a script that uses agentd's pool, and every agentd job) it
    is the box-wide one: what it guards holds across the user's jobs and scripts
    (:mod:`agent.coordination.boxwide`).
    """
    global _default, _box
    with _defaults_lock:  # one for the process, also when threads ask first at once
        if _env.get("AGENT_DAEMON") == "1":  # as default_pool() reads it
            if _box is None:
                from .boxwide import BoxCoordinator

                _box = BoxCoordinator()
            return _box
        if _default is None:
            _default = Coordinator()
        return _default


__all__ = ["Coordinator", "check_coordinator", "default_coordinator"]
