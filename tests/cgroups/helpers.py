"""Real confined children for the enforcement tests: fork, apply the child spec, run a workload.

A child talks to the test over two pipes: it sends JSON lines (``send``) and can block
until the test releases it (``wait``), so tests synchronise on messages, never on sleeps.
Every workload ends with ``os._exit`` so nothing of pytest runs in the child.
"""

from __future__ import annotations

import json
import mmap
import os
import time
import secrets
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from agent.executor import Attempt, Isolation
from agent.resources import ResourceRequirements
from agent.runtime.confine import apply
from agent.supervisor.cgroups import likely_backend
from agent.supervisor.confinement import Confiner


def _usable_backend() -> str | None:
    """The real cgroup backend here, judged from the mounts (nothing is created on import)."""
    name = likely_backend()
    return name if name in ("v1", "v2") else None


BACKEND = _usable_backend()

needs_cgroups = pytest.mark.skipif(BACKEND is None, reason="needs root and cgroup v1 or v2")
needs_v1 = pytest.mark.skipif(BACKEND != "v1", reason="needs root and cgroup v1")


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def leftover_cgroups(confiner: Confiner) -> list[str]:
    """Attempt cgroups still present under this supervisor's directories."""
    leaf = getattr(confiner.backend, "leaf", None)
    return [
        f"{d}/{name}"
        for d in confiner.backend.owned_dirs()
        for name in _subdirs(d)
        if f"{d}/{name}" != leaf
    ]


def make_attempt(
    resources: ResourceRequirements | None = None,
    *,
    isolation: Isolation = Isolation.PROCESS,
    assignment: dict[str, Any] | None = None,
    state: str = "work",
) -> Attempt:
    """An attempt as the scheduler hands it to an executor (the function is never called)."""

    async def never(context: Any) -> None:  # pragma: no cover
        raise AssertionError("the confinement tests run workloads, not state functions")

    return Attempt(
        run_id=secrets.token_hex(8),
        agent_name="cgroup-tests",
        state_name=state,
        func=never,
        number=1,
        context=None,  # type: ignore[arg-type]
        resources=resources,
        isolation=isolation,
        assignment=assignment or {},
    )


class Channel:
    """The child's end: send a message, wait for the test's go-ahead."""

    def __init__(self, out_fd: int, in_fd: int) -> None:
        self.out_fd, self.in_fd = out_fd, in_fd

    def send(self, **message: Any) -> None:
        os.write(self.out_fd, (json.dumps(message) + "\n").encode())

    def wait(self) -> None:
        os.read(self.in_fd, 1)


@dataclass
class Exit:
    code: int | None
    signal: int | None


class Child:
    """The test's end of one confined child."""

    def __init__(self, pid: int, from_child: int, to_child: int) -> None:
        self.pid = pid
        self._reader = os.fdopen(from_child, "r")
        self._to_child = to_child
        self.exit: Exit | None = None

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the child closed its end (it exited)."""
        line = self._reader.readline()
        return json.loads(line) if line else None

    def release(self) -> None:
        os.write(self._to_child, b"x")

    def wait(self) -> Exit:
        if self.exit is None:
            _, status = os.waitpid(self.pid, 0)
            if os.WIFSIGNALED(status):
                self.exit = Exit(None, os.WTERMSIG(status))
            else:
                self.exit = Exit(os.WEXITSTATUS(status), None)
            self._reader.close()
            os.close(self._to_child)
        return self.exit


def spawn(child_spec: dict[str, Any], work: Callable[[Channel], int | None]) -> Child:
    """Fork a child that applies ``child_spec`` and then runs ``work(channel)``."""
    from_child_r, from_child_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            os.close(from_child_r)
            os.close(to_child_w)
            apply(child_spec)
            code = work(Channel(from_child_w, to_child_r)) or 0
        except BaseException:
            try:
                os.write(2, traceback.format_exc().encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(from_child_w)
    os.close(to_child_r)
    return Child(pid, from_child_r, to_child_w)


# --- workloads (run in the child) --------------------------------------------------------


def allocate(megabytes: int) -> Callable[[Channel], int]:
    """Touch ``megabytes`` of fresh memory, then report and wait to be released."""

    def work(ch: Channel) -> int:
        ch.send(started=True)
        block = b"\x01" * (megabytes * 1024 * 1024)  # filled, so every page is resident
        ch.send(allocated=len(block))
        ch.wait()
        return 0

    return work


def spin(seconds: float) -> Callable[[Channel], int]:
    """Busy-loop for ``seconds`` of wall time; report wall and CPU time used."""

    def work(ch: Channel) -> int:
        start, cpu0 = time.monotonic(), time.process_time()
        while time.monotonic() - start < seconds:
            pass
        ch.send(wall=time.monotonic() - start, cpu=time.process_time() - cpu0)
        return 0

    return work


def fork_bomb(ch: Channel, most: int = 100_000, then_wait: bool = False, spread: bool = True) -> int:
    """Fork until refused (or ``most`` times); every child forks once more (unless not
    ``spread``: then every refusal comes before the report); all block forever.

    The first process reports and exits with 3, or with ``then_wait`` blocks too.
    """
    block_r, _block_w = os.pipe()  # nobody writes: readers block until killed
    forked, refused = 0, None
    while forked < most:
        try:
            pid = os.fork()
        except OSError as exc:
            refused = exc.errno
            break
        if pid == 0:  # pragma: no cover - a bomb process
            try:
                if spread:
                    os.fork()
            except OSError:
                pass
            os.read(block_r, 1)
            os._exit(0)
        forked += 1
    ch.send(forked=forked, errno=refused)
    if then_wait:
        ch.wait()
    return 3


def direct_write(path: str, nbytes: int, chunk: int = 1024 * 1024) -> Callable[[Channel], int]:
    """Write ``nbytes`` to ``path`` with O_DIRECT (bypassing the page cache); report time."""

    def work(ch: Channel) -> int:
        buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT needs
        buf.write(b"\x5a" * chunk)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            start = time.monotonic()
            written = 0
            while written < nbytes:
                written += os.write(fd, buf)
            os.fsync(fd)
            ch.send(written=written, seconds=time.monotonic() - start)
        finally:
            os.close(fd)
        return 0

    return work


def open_device(path: str) -> Callable[[Channel], int]:
    """Try to open a device node; report the errno (0 when it opened)."""

    def work(ch: Channel) -> int:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            ch.send(errno=0)
        except OSError as exc:
            ch.send(errno=exc.errno)
        return 0

    return work


def block(ch: Channel) -> int:
    """Start a grandchild that leaves the tree (double fork), report both pids, block."""
    hold_r, _hold_w = os.pipe()  # nobody writes: the grandchild blocks until killed
    pid_r, pid_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        grandchild = os.fork()
        if grandchild == 0:
            os.read(hold_r, 1)
            os._exit(0)
        os.write(pid_w, str(grandchild).encode().ljust(16))
        os._exit(0)
    os.waitpid(pid, 0)
    grandchild = int(os.read(pid_r, 16).decode())
    ch.send(pid=os.getpid(), grandchild=grandchild)
    ch.wait()
    return 0
