"""How the command line writes durations, times and state counts."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any


def duration(seconds: float) -> str:
    """``850 ms``, ``4.2 s``, ``2 min 05 s``, ``1 h 02 min``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def timestamp(epoch: float) -> str:
    """Local date and time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def ago(epoch: float, now: float | None = None) -> str:
    """``12 s ago``, ``3 min ago``, ``5 h ago``; older than a day: the date and time."""
    elapsed = (time.time() if now is None else now) - epoch
    if elapsed < 0:
        return timestamp(epoch)
    if elapsed < 60:
        return f"{elapsed:.0f} s ago"
    if elapsed < 3600:
        return f"{elapsed // 60:.0f} min ago"
    if elapsed < 86400:
        return f"{elapsed // 3600:.0f} h ago"
    return timestamp(epoch)


def counts(states: Mapping[str, Any]) -> str:
    """``3 of 5 states completed, 1 running, 1 failed`` from a snapshot's ``states``."""
    total = states.get("total", 0)
    parts = [f"{states.get('completed', 0)} of {total} state{'s' if total != 1 else ''} completed"]
    for key, label in (("running", "running"), ("waiting", "waiting"), ("failed", "failed"),
                       ("blocked", "blocked"), ("cancelled", "cancelled"), ("to_run_again", "to run again")):
        if states.get(key):
            parts.append(f"{states[key]} {label}")
    return ", ".join(parts)
