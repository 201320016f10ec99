"""The cgroup made ahead for a parked child (agent.supervisor.parked), read back later."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from agent.supervisor.cgroups import LimitEvents
from agent.supervisor.child import escape_reason
from agent.supervisor.confinement import Confinement
from agent.supervisor.parked import Parked, ParkedChildren

from .helpers import BACKEND, make_attempt, needs_cgroups

pytestmark = [pytest.mark.cgroup, needs_cgroups]

# Waits for a line, burns 0.3 s of CPU, says so, then waits to be killed.
_BURN = """
import sys, time
sys.stdin.readline()
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("burnt", flush=True)
sys.stdin.readline()
"""


def test_files_opened_at_park_read_what_the_child_spends_after(confiner) -> None:
    # The launch reads usage through descriptors opened when the child was parked: they
    # must show the figures of the moment they are read, not those of the park.
    child = subprocess.Popen([sys.executable, "-c", _BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    handle = None
    try:
        handle = confiner.park(child.pid)
        assert handle is not None
        before = handle.usage()["cpu_seconds"]
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "burnt\n"
        assert handle.usage()["cpu_seconds"] - before >= 0.25
    finally:
        child.kill()
        child.wait()
        if handle is not None:
            handle.remove()


# Warms up (0.3 s of CPU and a 256 MiB peak) before its launch, then works (0.2 s, little
# memory): each phase waits for a line and says when it is done.
_WARM_THEN_WORK = """
import sys, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
sys.stdin.readline()
block = bytearray(256 * 1024 * 1024)
block[::4096] = b"x" * len(block[::4096])
del block
burn(0.3)
print("warm", flush=True)
sys.stdin.readline()
burn(0.2)
print("worked", flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def _parked_warmed_up_then_launched(confiner) -> Iterator[tuple[int, float, Confinement]]:
    """A child parked in a cgroup of its own that warms up there, then is launched (its
    attempt's confinement made as a launch makes it) and works: its pid, the CPU seconds
    its cgroup counted before the launch, and the attempt's confinement."""
    child = subprocess.Popen([sys.executable, "-c", _WARM_THEN_WORK], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    handle = confinement = None

    def step(line: str, answer: str) -> None:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(line + "\n")
        child.stdin.flush()
        assert child.stdout.readline() == answer + "\n"

    try:
        handle = confiner.park(child.pid)
        assert handle is not None
        step("warm up", "warm")
        before = handle.usage()["cpu_seconds"]
        confinement = confiner.prepare(make_attempt(), parked=Parked(child.pid, handle))
        step("work", "worked")
        yield child.pid, before, confinement
    finally:
        child.kill()
        child.wait()
        if confinement is not None:
            confinement.close()
        elif handle is not None:
            handle.remove()


def test_an_attempt_in_a_parked_childs_cgroup_counts_from_its_launch(confiner) -> None:
    # A parked child warms up in its cgroup before any launch takes it: what it spent then
    # is not the attempt's (its figures count from the launch's prepare).
    with _parked_warmed_up_then_launched(confiner) as (_, before, confinement):
        assert before >= 0.25  # the cgroup saw the warm-up (less the last tick's worth, not added yet)
        usage = confinement.usage()
        assert 0.15 <= usage["cpu_seconds"] < 0.3  # the 0.2 s of work, not the 0.3 s of warm-up
        if BACKEND == "v1":  # v2 cannot restart a peak: memory.peak counts from the cgroup's start
            assert usage["peak_memory_bytes"] < 128 * 1024 * 1024
        assert confinement.limit_events() == LimitEvents()  # no limit hit since its launch


def test_what_a_parked_child_did_before_its_launch_is_no_escape(confiner) -> None:
    # The cgroup-escape check compares the process's own CPU time with its cgroup's. The
    # attempt's usage leaves out the parked child's warm-up; the check must not: here the
    # process's figures count from its fork (as for a child forked into the cgroup of a
    # parked child that was gone), warm-up and all, and nothing left the cgroup.
    with _parked_warmed_up_then_launched(confiner) as (pid, _, confinement):
        times = psutil.Process(pid).cpu_times()
        usage = confinement.usage()
        assert times.user + times.system > usage["cpu_seconds"] * 1.05 + 0.2  # the warm-up: in one figure only
        assert escape_reason(confinement, usage, times.user + times.system, None) is None


class _Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


def test_a_child_gone_before_its_cgroup_is_made_is_let_go_without_a_warning(confiner) -> None:
    # The zygote lets parked children go (idle, shutdown) while their cgroups are being
    # made: the move in then fails with ESRCH, which is no fault of anyone's.
    log = _Log()
    loop = asyncio.new_event_loop()
    try:
        parked = ParkedChildren(confiner, lambda: loop, log)
        with open("/proc/sys/kernel/pid_max") as f:
            no_such_pid = int(f.read()) + 1  # above the largest pid: no process has it
        parked.parked(no_such_pid)
        done = threading.Event()
        confiner.background(done.set)  # the confiner's thread works in order: the child's turn is over
        assert done.wait(30)
        loop.run_until_complete(asyncio.sleep(0))  # what the thread handed back to the loop
        assert log.warnings == []
        assert len(parked) == 0 and parked.take() is None
    finally:
        loop.close()


def test_let_go_closes_only_the_sockets_of_children_no_launch_took(confiner) -> None:
    # The zygote asks for parked children to be let go when nobody launches; one that a
    # launch took meanwhile (its let_go report crossed the launch) must keep its socket.
    children = [subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
                for _ in range(2)]
    ends = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in children]
    loop = asyncio.new_event_loop()
    parked = ParkedChildren(confiner, lambda: loop, _Log())
    try:
        for child, (ours, _) in zip(children, ends):
            parked.parked(child.pid, sock=ours)
        done = threading.Event()
        confiner.background(done.set)  # both cgroups are made: the thread works in order
        assert done.wait(30)
        loop.run_until_complete(asyncio.sleep(0))
        taken = parked.take()
        assert taken is not None and taken.pid == children[0].pid
        parked.let_go([child.pid for child in children])
        kept, let_go = ends[0][1], ends[1][1]
        let_go.settimeout(10)
        assert let_go.recv(16) == b""  # closed: that child exits
        kept.setblocking(False)
        with pytest.raises(BlockingIOError):
            kept.recv(16)  # still open: the launch hands it its spec
        sock = parked.take_socket(children[0].pid)
        assert sock is not None and sock.send(b"s") == 1
        sock.close()
        assert parked.take_socket(children[1].pid) is None
        confiner.let_go(taken)
    finally:
        parked.close()
        for child in children:
            child.kill()
            child.wait()
        for pair in ends:
            for end in pair:
                end.close()
        done = threading.Event()
        confiner.background(done.set)
        done.wait(30)
        loop.close()
