"""Fixtures for the enforcement tests: a real Confiner per test, checked clean afterwards."""

from __future__ import annotations

import os
from typing import Iterator

import psutil
import pytest

from agent.supervisor.confinement import Confiner

from .helpers import BACKEND, leftover_cgroups


@pytest.fixture
def confiner(tmp_path) -> Iterator[Confiner]:
    """A Confiner on this machine's cgroups whose IO throttles apply to tmp_path's disk."""
    if BACKEND is None:
        pytest.skip("needs root and cgroup v1 or v2")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    c = Confiner(io_paths=[str(tmp_path)], gpu_minors=[])
    dirs = c.backend.owned_dirs()
    try:
        yield c
    finally:
        left = leftover_cgroups(c)
        c.close()
    assert not left, f"attempt cgroups left behind: {left}"
    assert not [d for d in dirs if os.path.exists(d)], "supervisor cgroup directories left behind"
    stray = [
        p.pid
        for p in me.children(recursive=True)
        if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert not stray, f"child processes left behind: {stray}"
