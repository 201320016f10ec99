"""Live output of isolated states: each line to the attempt's log and, prefixed, to the terminal.

A state's process writes its stdout and stderr (one stream, as a terminal shows them)
into a pipe that the supervisor reads on its event loop. Each chunk is appended to the
attempt's log file at once, and each whole line is echoed with the state's name in
front, like ``docker compose``::

    format_output    | Result: Hello, World!
    train#2          | retrying after a timeout      (attempt 2)

The pipe's write end goes to the child with its spec (``SCM_RIGHTS``); the supervisor
closes its own copy once the child is known (forked, or a parked child handed its
spec), so that the child's exit reads as the end of the pipe. When the child is gone,
what is left in the pipe is read before the attempt's outcome is judged, so the log is
complete.

Where the echo goes: ``AGENT_ECHO`` is ``stdout`` (the default, also under plain
``python flow.py``), ``stderr``, or ``off``; ``agent run --quiet`` turns it off and
``agent run --json`` sends it to stderr. Code can install its own writer with
:func:`set_writer` (``agent run`` does, to keep its progress line below the output).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .. import values
from ..errors import InvalidConfigurationError

Writer = Callable[[str, Sequence[str]], None]
"""``writer(label, lines)``: whole lines (without their newline) one state printed."""

_CHUNK = 1 << 16
_MAX_LINE = 1 << 16  # a longer line without a newline is echoed in pieces
_BETWEEN = 4096  # what a worker printed outside any attempt, kept for its failure report
_COLORS = ("36", "33", "32", "35", "34", "31", "96", "93", "92", "95", "94")

_lock = threading.Lock()
_writer: Writer | None = None
_configured = False


class PrefixedWriter:
    """Writes ``label | line`` to a stream, labels padded to the widest seen, coloured on a TTY."""

    def __init__(self, stream: Callable[[], TextIO | None]) -> None:
        self._stream = stream
        self._width = 0
        self._colors: dict[str, str] = {}

    def __call__(self, label: str, lines: Sequence[str]) -> None:
        out = self._stream()
        if out is None:
            return
        label = values.printable(label)  # a state's name may hold a newline or an escape sequence
        self._width = max(self._width, min(len(label), 24))
        prefix = f"{label:<{self._width}} | "
        if _wants_color(out):
            code = self._colors.setdefault(label.partition("#")[0], _COLORS[len(self._colors) % len(_COLORS)])
            prefix = f"\033[{code}m{prefix}\033[0m"
        try:
            out.write("".join(f"{prefix}{line}\n" for line in lines))
            out.flush()
        except (OSError, ValueError):  # the terminal went away: the log still has it all
            pass


def _wants_color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def default_writer() -> Writer | None:
    """The writer ``AGENT_ECHO`` asks for (None for ``off``)."""
    value = os.environ.get("AGENT_ECHO", "")
    target = value.strip().lower() or "stdout"
    if target in ("off", "0", "no", "none", "quiet"):
        return None
    if target == "stderr":
        return PrefixedWriter(lambda: sys.stderr)
    if target == "stdout":
        return PrefixedWriter(lambda: sys.stdout)
    raise InvalidConfigurationError(f"AGENT_ECHO={value!r}: give stdout, stderr or off")


def set_writer(writer: Writer | None) -> None:
    """Echo isolated states' output through ``writer`` (None: only to the log files)."""
    global _writer, _configured
    with _lock:
        _writer, _configured = writer, True


def current_writer() -> Writer | None:
    global _writer, _configured
    with _lock:
        if not _configured:
            _writer, _configured = default_writer(), True
        return _writer


class _Sink:
    """One attempt's share of a pipe: appended to its log file, whole lines echoed with its label.

    The log file is created by ``create_log(log_path)`` when the first byte comes.
    """

    def __init__(
        self, log_path: str, create_log: Callable[[str], int], label: str, *,
        cap: int | None = None, on_cap: Callable[[int], None] | None = None, plain: bool = False,
    ) -> None:
        self.log_path = log_path
        self.label = label
        self._plain = plain  # echo control characters escaped (a sandbox's output: untrusted, shown on a terminal)
        self.size = 0
        self._cap = cap  # bytes kept at most; past it the rest is dropped and on_cap(cap) told once
        self._on_cap = on_cap
        self._create_log = create_log
        self._log_fd: int | None = None
        self.created = False
        self._writer = current_writer()
        self._partial = b""

    def take(self, data: bytes) -> None:
        cap = self._cap
        if cap is not None and self.size + len(data) > cap:
            data = data[: max(0, cap - self.size)]
            self._cap = self.size + len(data)  # nothing more gets in
            if self._on_cap is not None:
                on_cap, self._on_cap = self._on_cap, None
                on_cap(cap)
            if not data:
                return
        if not self.created:
            self.created = True
            try:
                self._log_fd = self._create_log(self.log_path)
            except OSError:  # a full disk must not stop the state: the echo still shows it
                self._log_fd = None
        view = memoryview(data)
        while view and self._log_fd is not None:
            try:
                written = os.write(self._log_fd, view)
            except OSError:
                break
            view = view[written:]
        self.size += len(data)
        if self._writer is None:
            return
        text = self._partial + data
        *lines, self._partial = text.split(b"\n")
        while len(self._partial) > _MAX_LINE:
            lines.append(self._partial[:_MAX_LINE])
            self._partial = self._partial[_MAX_LINE:]
        if lines:
            self._echo(lines)

    def finish(self) -> int:
        """Echo the unfinished last line, close the log file; returns the bytes logged."""
        if self._partial:
            self._echo([self._partial])
            self._partial = b""
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        return self.size

    def file_with(self, logs: Any, ended: float | None = None) -> None:
        """Finish, and hand the log to ``logs`` (an :class:`~agent.supervisor.logs.AttemptLogs`)
        as that of an attempt that ended at ``ended`` (default now)."""
        logs.finished(self.log_path, self.finish(), created=self.created, ended=ended)

    def _echo(self, lines: list[bytes]) -> None:
        if self._writer is None:
            return
        text = [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
        if self._plain:
            text = [values.printable(line, keep="\t") for line in text]
        try:
            self._writer(self.label, text)
        except Exception:  # a writer's failure never fails the attempt
            self._writer = None


class _Pipe:
    """A pipe a state's process writes its stdout and stderr to, read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._read_fd, False)  # only this end: the child's writes wait for room
        self.child_fd: int | None = write_fd
        """The pipe's write end, which goes to the child with its spec (its stdout and stderr);
        None once the child holds it (:meth:`child_started`)."""
        loop.add_reader(self._read_fd, self.drain)
        self._open = True
        self._reading = True

    def child_started(self) -> None:
        """The child holds the write end (it came with its spec): drop ours, so that the
        child's exit reads as the end of the pipe."""
        if self.child_fd is not None:
            os.close(self.child_fd)
            self.child_fd = None

    def move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read on ``loop`` from now on (the supervisor serves the caller's loop)."""
        if loop is self._loop or not self._open:
            return
        if self._reading and not self._loop.is_closed():
            self._loop.remove_reader(self._read_fd)
        self._loop = loop
        if self._reading:
            loop.add_reader(self._read_fd, self.drain)

    def drain(self) -> None:
        """Read what is in the pipe now, handing it to :meth:`take`."""
        while True:
            try:
                data = os.read(self._read_fd, _CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                if self._reading and not self._loop.is_closed():
                    self._loop.remove_reader(self._read_fd)  # EOF: else it stays readable forever
                self._reading = False
                return
            self.take(data)
            if len(data) < _CHUNK:
                return

    def take(self, data: bytes) -> None:
        raise NotImplementedError

    def _close_pipe(self) -> bool:
        """Read what the (gone) process left, stop reading; False when already closed."""
        if not self._open:
            return False
        self.child_started()
        self.drain()
        self._open = False
        if self._reading and not self._loop.is_closed():
            self._loop.remove_reader(self._read_fd)
        os.close(self._read_fd)
        return True


class AttemptOutput(_Pipe):
    """The pipe one attempt's process writes to, drained into its log file and the echo."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        log_path: str,
        create_log: Callable[[str], int],
        label: str,
        *,
        cap: int | None = None,
        on_cap: Callable[[int], None] | None = None,
        plain: bool = False,
    ) -> None:
        self._sink = _Sink(log_path, create_log, label, cap=cap, on_cap=on_cap, plain=plain)
        self.log_path = log_path
        self.label = label
        super().__init__(loop)

    def take(self, data: bytes) -> None:
        self._sink.take(data)

    def close_into(self, logs: Any, ended: float | None = None) -> None:
        """Close, and file the log with ``logs`` (an :class:`~agent.supervisor.logs.AttemptLogs`)
        as that of an attempt that ended (reported) at ``ended``, default now."""
        if self._close_pipe():
            self._sink.file_with(logs, ended)


class WorkerOutput(_Pipe):
    """The pipe of a worker, which serves many attempts: each gets what it printed.

    The worker flushes its streams before it says it is ready again, so everything an
    attempt printed is in the pipe when its end is known: :meth:`end_attempt` reads the
    pipe dry before it closes that attempt's log. What a worker prints between attempts
    (while starting, or from a thread a state left behind) belongs to no attempt: the
    last few KiB are kept in :attr:`between` to explain a worker that fails to start.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sink: _Sink | None = None
        self.between = b""
        super().__init__(loop)

    def begin_attempt(self, log_path: str, create_log: Callable[[str], int], label: str) -> None:
        self.drain()
        self.between = b""
        self._sink = _Sink(log_path, create_log, label)

    def end_attempt(self, logs: Any) -> None:
        """Read the pipe dry, close the attempt's log and file it with ``logs``."""
        if self._open:
            self.drain()
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.file_with(logs)

    def take(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.take(data)
        else:
            self.between = (self.between + data)[-_BETWEEN:]

    def close_into(self, logs: Any, ended: float | None = None) -> None:
        self._close_pipe()
        self.end_attempt(logs)


def label_for(state: str, attempt: int) -> str:
    """``state`` for a first attempt, ``state#n`` for the n-th."""
    return state if attempt <= 1 else f"{state}#{attempt}"
