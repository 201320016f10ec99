"""The cgroup made ahead for a parked child (agent.supervisor.parked), read back later."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any

import pytest

from agent.supervisor.parked import ParkedChildren

from .helpers import needs_cgroups

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
