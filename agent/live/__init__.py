"""The runs of this process, for whoever watches: ``agent run``'s progress, ``agent top``.

``Agent.run`` calls :func:`register` as a run starts and :func:`finished` as it ends: a
dictionary insert and a pop, nothing per state. The first registration also starts this
process's status endpoint (:mod:`agent.live.server`: a Unix socket served by one thread),
unless ``AGENT_STATUS_ENDPOINT=off``. Snapshots are built only when someone asks
(:mod:`agent.live.snapshot`), on the run's own event loop while it waits on one.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

from .._loops import call_on
from ..status import AgentStatus
from .snapshot import describe, is_finished

LOOP_ANSWER_TIMEOUT = 0.5
"""Seconds a snapshot waits for the run's event loop before reading without it."""
KEEP_FINISHED = 32
"""Finished runs still reported (while their agent object lives), newest first."""


class LiveRun:
    """One registered run: the agent (weakly) and when it started."""

    __slots__ = ("agent_ref", "run_id", "started", "started_mono", "ended_mono")

    def __init__(self, run_id: str, record: tuple[Any, ...]) -> None:
        self.run_id = run_id
        self.agent_ref, self.started, self.started_mono = record[:3]
        self.ended_mono: float | None = record[3] if len(record) > 3 else None  # once it is over

    @property
    def agent(self) -> Any:
        return self.agent_ref()

    @property
    def loop(self) -> Any:
        """The event loop the run waits on, while it has one: None once it is over, or
        while it runs without waiting (its states never await), when it is read directly."""
        run = getattr(self.agent, "_run", None)
        return getattr(getattr(run, "_driver", None), "loop", None)

    def snapshot(self, *, detail: bool = True) -> dict[str, Any] | None:
        """The run as plain data, or None when its agent is gone or has started another run."""
        agent = self.agent
        if agent is None or agent.run_id != self.run_id:
            return None
        if is_finished(agent):  # its clock stops at its last state's end
            ends = [m.finished_at for m in agent.state_metadata.values() if m.finished_at]
            end = max([self.started_mono, *ends])
            if agent.status is not AgentStatus.COMPLETED and self.ended_mono is not None:
                end = max(end, self.ended_mono)  # it failed or was cancelled while states waited
        else:
            end = time.monotonic()
        return describe(agent, self.started, end - self.started_mono, detail=detail)


# What registering costs a run is a tuple and a dictionary insert, and its end a pop and
# an append; nothing is scanned per run.
# Runs not over yet, by run id: (weakref to the agent, wall start, monotonic start).
_running: dict[str, tuple[Any, float, float]] = {}
# The newest runs that are over, (run id, record), oldest first: the deque forgets the rest.
_done: deque[tuple[str, tuple[Any, ...]]] = deque(maxlen=KEEP_FINISHED)
SWEEP_AT = 256
"""Runs not over yet at which the registry looks for agents that went away mid-run."""
_state = {"server": False, "sweep_at": SWEEP_AT}
_lock = threading.Lock()
_ref, _wall, _mono = weakref.ref, time.time, time.monotonic


def _forget_after_fork() -> None:
    """A forked process (``multiprocessing``'s workers) reports its own runs, on an endpoint
    of its own: not the copies of its parent's."""
    global _lock
    _running.clear()
    _done.clear()
    _state.update(server=False, sweep_at=SWEEP_AT)
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def register(agent: Any, wall: float | None = None, mono: float | None = None) -> None:
    """``agent`` has just started (or resumed) run ``agent.run_id``, at ``wall`` (time.time)
    and ``mono`` (time.monotonic) when the caller read them already (now otherwise).
    :func:`finished` says when it is over."""
    _running[agent.run_id or ""] = (_ref(agent), _wall() if wall is None else wall, _mono() if mono is None else mono)
    if len(_running) > _state["sweep_at"]:
        _sweep()
    if not _state["server"]:
        _state["server"] = True
        _start_server()


def finished(agent: Any) -> None:
    """``agent``'s run is over (completed, failed, cancelled or paused): it is kept among the
    newest :data:`KEEP_FINISHED` while its agent lives."""
    run_id = agent.run_id or ""
    record = _running.pop(run_id, None)
    if record is not None:
        _done.append((run_id, (*record, _mono())))


def runs() -> list[LiveRun]:
    """The registered runs, oldest first: each not over yet, and the newest that are over."""
    by_id = {run_id: record for run_id, record in list(_done)}
    by_id.update(list(_running.items()))  # a run resumed since it paused: its newer record
    entries = [LiveRun(run_id, record) for run_id, record in by_id.items()]
    entries.sort(key=lambda entry: entry.started_mono)
    return entries


def find(run_id: str) -> LiveRun | None:
    record = _running.get(run_id)
    if record is None:
        record = next((rec for rid, rec in reversed(list(_done)) if rid == run_id), None)
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


def _sweep() -> None:
    """Forget the runs whose agent went away (or ran again) without its run ending, and
    set those that ended aside as :func:`finished` does (amortised O(1) per run)."""
    with _lock:
        for run_id, record in list(_running.items()):
            agent = record[0]()
            if agent is None or agent.run_id != run_id:
                _running.pop(run_id, None)
            elif is_finished(agent):
                finished(agent)
        _state["sweep_at"] = max(SWEEP_AT, 2 * len(_running))


def _start_server() -> None:
    if os.environ.get("AGENT_STATUS_ENDPOINT", "on").strip().lower() in ("off", "0", "no", "false"):
        return
    from .server import start

    start()
