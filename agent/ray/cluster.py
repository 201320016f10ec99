"""The Ray cluster as the driver sees it: connecting, and what its nodes can hold.

Connecting: a process that called ``ray.init(...)`` itself keeps that connection (any
address and options). Otherwise the first Ray attempt calls ``ray.init()``, which joins
the cluster named by ``RAY_ADDRESS`` (``auto`` for one started with ``ray start`` on this
machine, ``host:6379``, or ``ray://host:10001`` through Ray Client) and starts a local
one when it is unset, on a daemon thread of its own that lives as long as the process
(the local cluster's processes are tied to that thread; Ray's exit handler stops them).

Capacity: a Ray task that no node can hold waits in Ray's queue for ever. Before each
submission the request is checked against the resources of the cluster's alive nodes
(re-read every few seconds, and again before refusing), and a request that no single
node can hold fails at once with :class:`~agent.errors.RayCapacityError`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from types import ModuleType
from typing import Any, Callable

from ..errors import RayCapacityError, RayUnavailableError
from ..executor import RAY_MISSING

_lock = threading.Lock()

REFRESH_SECONDS = 5.0
"""How long a reading of the nodes' resources is trusted for a request that fits."""


def ray_module() -> ModuleType:
    """Ray, imported; :class:`RayUnavailableError` when it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(RAY_MISSING) from exc
    return ray


def connect() -> ModuleType:
    """Ray, connected to a cluster (the caller's, ``RAY_ADDRESS``'s, or a new local one)."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    with _lock:
        if not ray.is_initialized():
            try:
                _init_on_a_thread_of_its_own(ray)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RayUnavailableError(
                    f"cannot connect to a Ray cluster ({exc}): check RAY_ADDRESS, or call "
                    "ray.init(...) yourself before the run"
                ) from exc
    return ray


def _init_on_a_thread_of_its_own(ray: ModuleType) -> None:
    """``ray.init()`` on a daemon thread that then waits for the process to end.

    A local cluster's processes get a parent-death signal tied to the *thread* that
    started them: on a thread that ends with its event loop (``asyncio.to_thread``'s) the
    cluster died with the first run, and on a thread joined at interpreter exit (a thread
    pool's) before Ray's own exit handler stopped it, two of its processes were left for a
    minute. A daemon thread is never joined: Ray's handler stops the cluster first.
    """
    started: Future[None] = Future()

    def keep() -> None:
        try:
            ray.init()
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        threading.Event().wait()

    global _starting
    if _starting is None or _starting.done():  # else an earlier ray.init() still waits: wait for it again
        _starting = started
        threading.Thread(target=keep, name="agent-ray-cluster", daemon=True).start()
    try:
        _starting.result(timeout=CONNECT_SECONDS)
    except FutureTimeout:
        where = os.environ.get("RAY_ADDRESS") or "a new local cluster"
        raise RayUnavailableError(
            f"no Ray cluster answered at {where} within {CONNECT_SECONDS:g} s: check RAY_ADDRESS (ray.init() "
            "waits for ever on an address nothing serves), or call ray.init(...) yourself before the run"
        ) from None


CONNECT_SECONDS = 30.0
"""How long a run waits for ``ray.init()`` to connect (a local cluster starts in a few seconds)."""
_starting: Future[None] | None = None  # the ray.init() under way on its thread, if any


def is_connected() -> bool:
    """Whether this process is connected to a Ray cluster (imports nothing new)."""
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class Capacity:
    """The alive nodes' resources, to refuse what no node can hold."""

    def __init__(self, read_nodes: Callable[[], list[dict[str, Any]]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read_nodes = read_nodes
        self._clock = clock
        self._nodes: list[dict[str, float]] = []
        self._read_at = -math.inf

    def needs_reading(self, request: dict[str, float]) -> bool:
        """Whether :meth:`check` would read the nodes first (what it knows is old, or too little)."""
        return self._clock() - self._read_at >= REFRESH_SECONDS or not self._fits(request)

    def check(self, state: str, request: dict[str, float], *, read: bool = True) -> None:
        """Raise :class:`RayCapacityError` when no alive node can hold ``request`` (reading the
        nodes first when :meth:`needs_reading`, unless ``read`` is False)."""
        if read and self.needs_reading(request):
            self.read()
        if not self._fits(request):
            raise RayCapacityError(self._refusal(state, request))

    def read(self) -> None:
        """Read the alive nodes' resources (a call to the cluster: it blocks while that is unreachable)."""
        self._nodes = [dict(node.get("Resources") or {}) for node in self._read_nodes() if node.get("Alive")]
        self._read_at = self._clock()

    def _fits(self, request: dict[str, float]) -> bool:
        return any(all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in request.items())
                   for node in self._nodes)

    def _refusal(self, state: str, request: dict[str, float]) -> str:
        asked = ", ".join(_amount(name, amount) for name, amount in request.items())
        if not self._nodes:
            return f"state {state!r} asks Ray for {asked}, but the Ray cluster has no alive node"
        largest = ", ".join(_amount(name, max(node.get(name, 0.0) for node in self._nodes))
                            for name in request)
        return (
            f"state {state!r} asks Ray for {asked}, but no alive node of the Ray cluster can hold "
            f"that ({len(self._nodes)} node(s); the most any node has: {largest}): lower the "
            "request, or add a node that has it"
        )

    def totals(self) -> dict[str, float]:
        """The sum of every alive node's resources (read now)."""
        self.read()
        out: dict[str, float] = {}
        for node in self._nodes:
            for name, amount in node.items():
                out[name] = out.get(name, 0.0) + amount
        return out


def _amount(name: str, amount: float) -> str:
    if name == "memory":
        return f"{amount / 2**20:.0f} MiB of memory"
    return f"{amount:g} {name}"
