"""What ``agent run`` shows while a run goes: state output, a progress line, notices.

* On a terminal, one progress line is kept at the bottom of stderr and redrawn; whatever
  the run prints (states' output, ``print`` in inline states, a human-input prompt) is
  written above it. ``sys.stdout`` and ``sys.stderr`` are wrapped for the run so that
  every write clears the line first; a write that leaves a line open (a prompt) hides it
  until the line is finished.
* Elsewhere (a pipe, a file, CI), a plain line now and then, when something changed.
* Either way, notices as they happen: the run id, retries, blocked and preempted states,
  questions waiting for an answer that nobody can type.

Counts come from the runs' snapshots (:mod:`agent.live`), read on their own loop from a
thread, so they tick even while a file runs its agent with ``run_sync()``; notices come
from the runs' events (an ambient observer).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from .. import events as ev
from .. import live
from ..values import printable
from .text import counts, duration

BAR_WIDTH = 20


class Terminal:
    """The real stdout and stderr, and the progress line kept below what is written to them."""

    def __init__(self, out: TextIO, err: TextIO, *, bar: bool) -> None:
        self.out = out
        self.err = err
        self.bar = bar and _isatty(err)
        self._lock = threading.RLock()
        self._text = ""
        self._drawn = False
        self._open_line = False  # the last write left a line unfinished (a prompt): no bar now
        self.on_reader_gone: Callable[[], None] | None = None  # told once, from the writing thread
        self.reader_gone = False

    def write(self, stream: TextIO, text: str) -> None:
        """Write ``text`` to ``stream`` above the progress line.

        When the reader of stdout went away (``agent run flow.py | head``), what is written
        there from then on is dropped, and ``on_reader_gone`` is told (once): the writer, a
        state's ``print`` say, never sees the broken pipe."""
        with self._lock:
            self._clear()
            try:
                stream.write(text)
                stream.flush()
            except BrokenPipeError:  # stderr too, when both went to the reader (2>&1 | head)
                self._drop(stream)
                return
            if text:
                self._open_line = not text.endswith("\n")
            self._draw()

    def _drop(self, stream: TextIO) -> None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass
        if stream is self.out and not self.reader_gone:
            self.reader_gone = True
            if self.on_reader_gone is not None:
                self.on_reader_gone()

    def notice(self, text: str) -> None:
        """One line on stderr."""
        self.write(self.err, text.rstrip("\n") + "\n")

    def show(self, text: str) -> None:
        """Replace the progress line (on a terminal only)."""
        with self._lock:
            self._text = text
            self._clear()
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self._text = ""

    def _clear(self) -> None:
        if self._drawn:
            self.err.write("\r\033[K")
            self.err.flush()
            self._drawn = False

    def _draw(self) -> None:
        if self.bar and self._text and not self._open_line:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.err.write(self._text[:width])
            self.err.flush()
            self._drawn = True


class RoutedStream(io.TextIOBase):
    """A stand-in for ``sys.stdout`` / ``sys.stderr`` that writes through the :class:`Terminal`."""

    def __init__(self, terminal: Terminal, target: TextIO) -> None:
        self._terminal = terminal
        self._target = target

    def write(self, text: str) -> int:
        self._terminal.write(self._target, text)
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return _isatty(self._target)

    def __getattr__(self, name: str) -> Any:  # buffer, errors, ...: the real stream's
        return getattr(self._target, name)

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Notices:
    """An observer of every run in the process: says what a user should know as it happens."""

    def __init__(self, terminal: Terminal, *, announce: bool = True) -> None:
        self._terminal = terminal
        self._announce = announce
        self._last_error: dict[tuple[str, str], str] = {}
        # Runs a pause stopped states of: what their stop blocks runs on resume (not news).
        self._paused: set[str] = set()

    def __call__(self, event: ev.RunEvent) -> None:
        kind = event.kind
        if kind == ev.STATE_PAUSED:
            self._paused.add(event.run_id)
        elif kind == ev.STATE_STARTED:
            self._paused.discard(event.run_id)
        if kind == ev.RUN_STARTED:
            if self._announce:
                verb = "resumed" if event.data.get("resumed") else "started"
                self._terminal.notice(f"agent run: {verb} {printable(event.agent_name)}, run id {event.run_id}")
        elif kind == ev.STATE_FAILED and not event.data.get("final"):
            self._last_error[(event.run_id, event.state or "")] = event.error or "failed"
        elif kind == ev.STATE_FAILED and event.data.get("run_goes_on"):
            self._terminal.notice(f"agent run: {event.state} failed for good ({_first_line(event.error or '')}); "
                                  "the run goes on (on_failure='continue')")
        elif kind == ev.STATE_RETRYING:
            error = self._last_error.pop((event.run_id, event.state or ""), "failed")
            delay = float(event.data.get("delay") or 0.0)
            self._terminal.notice(f"agent run: {event.state}: attempt {event.attempt} failed ({_first_line(error)}); "
                                  f"retrying in {duration(delay)}")
        elif kind == ev.STATE_BLOCKED and event.run_id not in self._paused:
            self._terminal.notice(f"agent run: {event.state} is blocked: {_first_line(event.error or '')}")
        elif kind == ev.STATE_PREEMPTED:
            self._terminal.notice(f"agent run: {event.state} was preempted by a higher-priority state; it will re-run")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


class Progress:
    """A thread that reads the runs started since ``since`` and keeps the user informed:
    a progress line (not with ``lines=False``: ``--no-progress``) and notices of questions."""

    def __init__(self, terminal: Terminal, since: float, *, plain_every: float = 10.0, lines: bool = True) -> None:
        self._terminal = terminal
        self._lines = lines
        self._since = since
        self._base_interval = self._interval = 0.1 if terminal.bar else 1.0
        self._plain_every = plain_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agent-run-progress", daemon=True)
        self._asked: set[str] = set()
        self._last_line = ""
        self._last_line_at = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._terminal.close()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            started = time.monotonic()
            entries = [e for e in live.runs() if e.started >= self._since]
            snapshots = live.read(entries) if entries else []
            if self._stop.is_set():
                return
            self._human_notices(snapshots)
            if snapshots and self._lines:
                self._report(snapshots)
            # A big workflow costs its loop more to read: read it less often (5 s at most).
            self._interval = max(self._base_interval, min(5.0, 20 * (time.monotonic() - started)))

    def _report(self, snapshots: list[dict[str, Any]]) -> None:
        active = [s for s in snapshots if s["status"] in ("running", "paused")] or snapshots[-1:]
        total = {key: sum(s["states"].get(key, 0) for s in active) for key in active[0]["states"]}
        elapsed = max(s["elapsed"] for s in active)
        running = [printable(r["state"]) for s in active for r in s.get("running", ())]
        if self._terminal.bar:
            finished = total["completed"] + total["failed"] + total["cancelled"] + total["blocked"]
            filled = round(BAR_WIDTH * finished / total["total"]) if total["total"] else 0
            bar = "█" * filled + "░" * (BAR_WIDTH - filled)
            name = printable(active[0]["agent"]) if len(active) == 1 else f"{len(active)} runs"
            parts = [f"{name} {bar} {total['completed']}/{total['total']} done"]
            parts += [f"{total[k]} {k}" for k in ("running", "waiting", "failed") if total[k]]
            parts.append(duration(elapsed))
            if running:
                parts.append(", ".join(running[:4]) + (" ..." if len(running) > 4 else ""))
            self._terminal.show(" · ".join(parts))
            return
        line = counts(total)
        now = time.monotonic()
        if (line != self._last_line and now - self._last_line_at >= self._plain_every) or (
            now - self._last_line_at >= 6 * self._plain_every
        ):
            self._last_line, self._last_line_at = line, now
            detail = f"; running: {', '.join(running[:6])}" if running else ""
            self._terminal.notice(f"agent run: {line} after {duration(elapsed)}{detail}")

    def _human_notices(self, snapshots: list[dict[str, Any]]) -> None:
        from ..human import stdin_kind

        for snap in snapshots:
            for request in snap.get("human_input", ()):
                if request["id"] in self._asked:
                    continue
                self._asked.add(request["id"])
                then = ""
                if request.get("timeout") is not None:
                    fallback = (f"{request['default']!r}, the default, is used" if request.get("default") is not None
                                else "the state fails")
                    then = f"; after {duration(request['timeout'])} {fallback}"
                where = ("a line on stdin, or its input queue" if stdin_kind() == "pipe" else
                         "its input queue (stdin is not a terminal, so nobody is asked here)")
                self._terminal.notice(
                    f"agent run: {request['state']} waits for an answer to {request['prompt']!r} from {where}{then}"
                )


def route_std_streams(terminal: Terminal, *, stdout_to_stderr: bool = False) -> tuple[TextIO, TextIO]:
    """Wrap ``sys.stdout`` / ``sys.stderr`` for the run; returns the originals to restore."""
    import sys

    saved = (sys.stdout, sys.stderr)
    sys.stdout = RoutedStream(terminal, terminal.err if stdout_to_stderr else terminal.out)  # type: ignore[assignment]
    sys.stderr = RoutedStream(terminal, terminal.err)  # type: ignore[assignment]
    return saved
