"""One local Ray cluster for the Ray tests, started once and shut down after them.

Ray is heavy (about 4-20 s to start on a 2-core machine), so every test of this
package shares one cluster: 2 CPUs, one logical GPU (Ray counts it; there is no device)
and a custom resource ``disk`` of 2, with its files in a temporary folder of its own.
When the package is done the cluster is shut down, and every process it started must be
gone (no orphans) and its folder removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

CLUSTER = {"num_cpus": 2, "num_gpus": 1, "resources": {"disk": 2}}

_roots: set[int] = set()


def _descendants() -> list[psutil.Process]:
    return psutil.Process(os.getpid()).children(recursive=True)


def _from_ray(proc: psutil.Process) -> bool:
    """Whether ``proc`` is one of the cluster's processes or was started by one (its workers)."""
    if proc.pid in _roots:
        return True
    try:
        return any(parent.pid in _roots for parent in proc.parents())
    except psutil.Error:
        return True  # gone while we looked: not left behind


_folder: list[str] = []  # the package's cluster's files


def _start(temp_dir: str) -> None:
    import ray

    before = {p.pid for p in _descendants()}
    ray.init(
        **CLUSTER, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
        object_store_memory=80 * 1024 * 1024, _temp_dir=temp_dir,
    )
    _roots.update(p.pid for p in _descendants() if p.pid not in before)


def restart_cluster() -> None:
    """``ray.shutdown()`` and ``ray.init()`` again, as a program that reconnects does: a new
    local cluster like the first, its files in a folder inside the first's (removed with it)."""
    import ray

    ray.shutdown()
    _start(tempfile.mkdtemp(prefix="again-", dir=_folder[0]))


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[Any]:
    """The running local cluster (the ``ray`` module, connected)."""
    ray = pytest.importorskip("ray")
    before = {p.pid for p in _descendants()}
    temp_dir = tempfile.mkdtemp(prefix="agent-ray-")
    _folder[:] = [temp_dir]
    _start(temp_dir)
    try:
        yield ray
    finally:
        started = [p for p in _descendants() if p.pid not in before and _from_ray(p)]
        ray.shutdown()
        _, alive = psutil.wait_procs(started, timeout=30)
        for proc in alive:
            proc.kill()
        _roots.clear()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"Ray left processes behind: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture(autouse=True)
def no_orphan_processes() -> Iterator[None]:
    """As tests/conftest.py's, except that the cluster's own processes may come and go."""
    before = {p.pid for p in _descendants()}
    yield
    leftover = []
    for proc in _descendants():
        if proc.pid in before or _from_ray(proc):
            continue
        try:
            cmd = " ".join(proc.cmdline())
            if proc.status() == psutil.STATUS_ZOMBIE or not cmd:
                continue  # exiting: no command line means its memory is gone already
        except psutil.Error:
            continue
        if "agent.runtime" in cmd and "zygote" in cmd:
            continue
        leftover.append((proc.pid, cmd))
    assert not leftover, f"test left child processes behind: {leftover}"
