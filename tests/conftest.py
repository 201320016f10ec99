"""Shared fixtures: every test must leave no child processes behind."""

from __future__ import annotations

import os

import psutil
import pytest


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
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "agent.runtime" in cmd and "zygote" in cmd:
            continue  # the per-process supervisor's zygote stays warm between runs by design
        if p.status() == psutil.STATUS_ZOMBIE:
            continue
        leftover.append((p.pid, cmd))
    assert not leftover, f"test left child processes behind: {leftover}"
