"""The runs of this process, for whoever watches: ``agent run``'s progress, ``agent top``.

``Agent.run`` calls :func:`register` as a run starts: a dictionary insert, nothing per
state. The first registration also starts this process's status endpoint
(:mod:`agent.live.server`: a Unix socket served by one thread), unless
``AGENT_STATUS_ENDPOINT=off``. Snapshots are built only when someone asks
(:mod:`agent.live.snapshot`), on the run's own event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import weakref
from typing import Any

from .._loops import call_on
from .snapshot import describe, is_finished

LOOP_ANSWER_TIMEOUT = 0.5
"""Seconds a snapshot waits for the run's event loop before reading without it."""
KEEP_FINISHED = 32
"""Finished runs still reported (while their agent object lives), newest first."""


class LiveRun:
    """One registered run: the agent (weakly), its loop, when it started."""

    __slots__ = ("agent_ref", "run_id", "loop", "started", "started_mono")

    def __init__(self, run_id: str, record: tuple[Any, Any, float, float]) -> None:
        self.run_id = run_id
        self.agent_ref, self.loop, self.started, self.started_mono = record

    @property
    def agent(self) -> Any:
        return self.agent_ref()

    def snapshot(self, *, detail: bool = True) -> dict[str, Any] | None:
        """The run as plain data, or None when its agent is gone or has started another run."""
        agent = self.agent
        if agent is None or agent.run_id != self.run_id:
            return None
        end = _finished.get(self.run_id)
        if end is None:
            if is_finished(agent):
                ends = [m.finished_at for m in agent.state_metadata.values() if m.finished_at]
                end = _finished[self.run_id] = max([self.started_mono, *ends])
            else:
                end = time.monotonic()
        return describe(agent, self.started, end - self.started_mono, detail=detail)


# run id -> (weakref to the agent, its loop, wall start, monotonic start): a tuple, so that
# registering costs a run a few dictionary and clock calls and nothing else.
_runs: dict[str, tuple[Any, Any, float, float]] = {}
_finished: dict[str, float] = {}
_state = {"server": False, "prune_at": 2 * KEEP_FINISHED}
_lock = threading.Lock()
_ref, _wall, _mono, _running_loop = weakref.ref, time.time, time.monotonic, asyncio.get_running_loop


def _forget_after_fork() -> None:
    """A forked process (``multiprocessing``'s workers) reports its own runs, on an endpoint
    of its own: not the copies of its parent's."""
    global _lock
    _runs.clear()
    _finished.clear()
    _state.update(server=False, prune_at=2 * KEEP_FINISHED)
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def register(agent: Any, wall: float | None = None, mono: float | None = None) -> None:
    """``agent`` has just started (or resumed) run ``agent.run_id``, at ``wall`` (time.time)
    and ``mono`` (time.monotonic) when the caller read them already (now otherwise)."""
    run_id = agent.run_id or ""
    _runs.pop(run_id, None)  # re-inserted last: the dict stays in start order
    _runs[run_id] = (_ref(agent), _running_loop(), _wall() if wall is None else wall,
                     _mono() if mono is None else mono)
    if len(_runs) > _state["prune_at"]:
        _forget_finished()
    if not _state["server"]:
        _state["server"] = True
        _start_server()


def runs() -> list[LiveRun]:
    """The registered runs, oldest first."""
    return [LiveRun(run_id, record) for run_id, record in list(_runs.items())]


def find(run_id: str) -> LiveRun | None:
    record = _runs.get(run_id)
    return LiveRun(run_id, record) if record is not None else None


def read(entries: list[LiveRun], *, detail: bool = True) -> list[dict[str, Any]]:
    """Snapshots of ``entries`` from any thread: each built on its run's loop when that loop
    answers within :data:`LOOP_ANSWER_TIMEOUT`, else read directly (a stuck loop is when a
    view is most wanted)."""
    by_loop: dict[Any, list[LiveRun]] = {}
    for entry in entries:
        by_loop.setdefault(entry.loop, []).append(entry)
    out: list[dict[str, Any] | None] = []
    for loop, group in by_loop.items():
        out.extend(_read_on(loop, group, detail))
    return [s for s in out if s is not None]


def _read_on(loop: Any, entries: list[LiveRun], detail: bool) -> list[dict[str, Any] | None]:
    def read_all() -> list[dict[str, Any] | None]:
        return [entry.snapshot(detail=detail) for entry in entries]

    try:
        return call_on(loop, read_all, LOOP_ANSWER_TIMEOUT)
    except (RuntimeError, concurrent.futures.TimeoutError):
        pass  # closed meanwhile, busy, or changed while read here: read from here (again)
    for _ in range(3):
        try:
            return read_all()
        except RuntimeError:  # changed while read ("dictionary changed size"): again
            continue
    return []


def _forget_finished() -> None:
    """Forget the oldest finished runs (or whose agent is gone or runs again) until at most
    ``KEEP_FINISHED`` runs are left besides those still going. Oldest first, stopping
    there: about one run looked at per registration."""
    with _lock:
        excess = len(_runs) - KEEP_FINISHED
        for run_id, record in list(_runs.items()):  # in start order
            if excess <= 0:
                break
            agent = record[0]()
            if agent is None or agent.run_id != run_id or is_finished(agent):
                del _runs[run_id]
                _finished.pop(run_id, None)
                excess -= 1
        _state["prune_at"] = max(2 * KEEP_FINISHED, 2 * len(_runs))  # amortised O(1) per run


def _start_server() -> None:
    if os.environ.get("AGENT_STATUS_ENDPOINT", "on").strip().lower() in ("off", "0", "no", "false"):
        return
    from .server import start

    start()
