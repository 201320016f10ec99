"""Shared fixtures: every test must leave no child processes behind, and nothing outside its temp dirs.

The default checkpoint store, the index of stores and the status sockets live in a
directory of this test session (``AGENT_STATE_DIR``, ``AGENT_RUNTIME_DIR``), never in
the user's home or runtime directory: the tests must not see (or show up in) the runs
of anything else on the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import psutil
import pytest

_SESSION_DIR = tempfile.mkdtemp(prefix="agent-tests-")
os.environ["AGENT_STATE_DIR"] = os.path.join(_SESSION_DIR, "state")
os.environ["AGENT_RUNTIME_DIR"] = os.path.join(_SESSION_DIR, "run")


def pytest_sessionstart(session: pytest.Session) -> None:
    from agent._compiled import stale

    changed = stale()
    if changed:  # the tests would run the old compiled code, not the source they read
        pytest.exit(f"{', '.join(changed)} changed after it was compiled: install again (scripts/install.sh) "
                    "before testing", returncode=4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_orphan_processes():
    """Fail a test that leaves a child process of its own behind (the shared zygote excepted)."""
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leftover = []
    for p in me.children(recursive=True):
        if p.pid in before:
            continue
        try:  # a process may end while it is looked at: then it is no leftover
            cmd = " ".join(p.cmdline())
            exiting = p.status() == psutil.STATUS_ZOMBIE or not cmd
        except psutil.Error:
            continue
        if "agent.runtime" in cmd and "zygote" in cmd:
            continue  # the per-process supervisor's zygote stays warm between runs by design
        if exiting:
            continue  # reaped soon (no command line: it is exiting, its memory is gone)
        leftover.append((p.pid, cmd))
    assert not leftover, f"test left child processes behind: {leftover}"
