"""A run as plain data: what ``agent run``'s progress line, the status endpoint and ``agent top`` show.

Read from the agent's public status (``agent.status``, ``agent.state_metadata``) when
asked, not from events: a run nobody watches pays nothing for being watchable. Counts
put every state of the agent in one bucket: ``completed``, ``running``, ``waiting``
(ready but held back by resources, concurrency, a rate limit or a dependency it is
about to meet), ``failed`` (failed or timed out for good), ``blocked``, ``cancelled``,
``pending`` (not reached yet).
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..status import AgentStatus, StateStatus

TERMINAL = frozenset({AgentStatus.COMPLETED, AgentStatus.FAILED, AgentStatus.CANCELLED})
BUCKETS = ("completed", "running", "waiting", "failed", "blocked", "cancelled", "pending")
MAX_LISTED = 50
"""At most this many states per list (running, waiting, failed); ``more`` counts the rest."""

_BUCKET = {
    StateStatus.COMPLETED: "completed",
    StateStatus.RUNNING: "running",
    StateStatus.READY: "waiting",
    StateStatus.FAILED: "failed",
    StateStatus.TIMEOUT: "failed",
    StateStatus.BLOCKED: "blocked",
    StateStatus.CANCELLED: "cancelled",
}


def bucket(meta: Any) -> str:
    """Which count a state's metadata falls in."""
    found = _BUCKET.get(meta.status)
    if found is not None:
        return found
    return "waiting" if meta.waiting_for else "pending"


def describe(agent: Any, started: float, elapsed: float, *, detail: bool = True) -> dict[str, Any]:
    """``agent``'s current (or last) run; ``started`` is wall time, ``elapsed`` seconds."""
    now = time.monotonic()
    counts = dict.fromkeys(BUCKETS, 0)
    running: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    isolation = getattr(agent.isolation, "value", str(agent.isolation))
    for name, meta in list(agent.state_metadata.items()):
        kind = bucket(meta)
        counts[kind] += 1
        if not detail:
            continue
        if kind == "running":
            running.append({
                "state": name, "attempt": meta.attempts,
                "for": round(max(0.0, now - meta.started_at), 3) if meta.started_at else 0.0,
                "isolation": getattr(meta.isolation, "value", None) or isolation,
            })
        elif kind == "waiting":
            waiting.append({"state": name, "why": meta.waiting_for or "ready"})
        elif kind in ("failed", "blocked"):
            failed.append({"state": name, "status": meta.status.value, "attempts": meta.attempts,
                           "error": meta.error_message or meta.blocked_reason or ""})
    out: dict[str, Any] = {
        "agent": agent.name,
        "run_id": agent.run_id or "",
        "status": agent.status.value,
        "pid": os.getpid(),
        "started": round(started, 3),
        "elapsed": round(elapsed, 3),
        "states": {"total": sum(counts.values()), **counts},
    }
    if detail:
        running.sort(key=lambda s: -s["for"])
        for key, items in (("running", running), ("waiting", waiting), ("failed", failed)):
            out[key] = items[:MAX_LISTED]
            if len(items) > MAX_LISTED:
                out[f"{key}_more"] = len(items) - MAX_LISTED
        out["human_input"] = human_requests(agent)
    return out


def human_requests(agent: Any) -> list[dict[str, Any]]:
    """Questions of this run waiting for an answer in a programmatic queue (not the console)."""
    from ..human import process_queue

    providers = [agent.human_input] if agent.human_input is not None else [process_queue()]
    found = []
    for provider in providers:
        pending = getattr(provider, "pending", None)
        if pending is None:
            continue
        for request in pending():
            if request.run_id == agent.run_id:
                found.append({"id": request.id, "state": request.state, "prompt": request.prompt,
                              "default": request.default, "timeout": request.timeout,
                              "asked": round(request.created, 3)})
    return found


def is_finished(agent: Any) -> bool:
    return agent.status in TERMINAL
