"""Process-isolation tests: a short stop grace, and a no-leftovers check after each test."""

from __future__ import annotations

import os

os.environ.setdefault("AGENT_STOP_GRACE", "0.5")  # read when the supervisor starts

import pytest

from agent.executor import Isolation
from agent.supervisor import current_supervisor

from . import helpers
from .helpers import describe, stray_processes


@pytest.fixture(params=[Isolation.PROCESS, Isolation.WORKER], ids=["process", "worker"])
def level(request):
    """Run the test at each isolation level whose states run in a child of the supervisor."""
    helpers.LEVEL = request.param
    yield request.param
    helpers.LEVEL = Isolation.PROCESS


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test leaves no state process, no extra socket file and no live child record."""
    yield
    strays = stray_processes()
    assert not strays, f"leftover processes: {describe(strays)}"
    sup = current_supervisor()
    if sup is not None:
        assert os.listdir(sup.ipc_dir) == ["supervisor.sock"]
        assert sup.statistics().children_running == 0
