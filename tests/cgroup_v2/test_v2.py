"""cgroup v2 enforcement, run inside a guest whose /sys/fs/cgroup is the unified hierarchy.

Kept small on purpose: the guest is software-emulated and Python is slow there.
``AGENT_GUEST_DISK`` names a scratch block device for the io.max test.
"""

from __future__ import annotations

import os
import signal

import pytest

from agent.resources import ResourceRequirements
from agent.supervisor.confinement import Confiner
from tests.cgroups.helpers import (
    BACKEND,
    allocate,
    direct_write,
    fork_bomb,
    leftover_cgroups,
    make_attempt,
    spawn,
    spin,
)

pytestmark = [pytest.mark.guest, pytest.mark.skipif(BACKEND != "v2", reason="needs root on cgroup v2")]

MiB = 1024 * 1024
DISK = os.environ.get("AGENT_GUEST_DISK")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


@pytest.fixture
def confiner():
    c = Confiner(io_paths=[DISK] if DISK else None, gpu_minors=[])
    dirs = c.backend.owned_dirs()
    try:
        yield c
    finally:
        left = leftover_cgroups(c)
        c.close()
    assert not left, f"attempt cgroups left behind: {left}"
    assert not [d for d in dirs if os.path.exists(d)]


class TestV2Limits:
    """Each limit is written to the unified hierarchy and holds against a child that breaks it."""

    def test_memory_limit_kills_and_is_reported(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        try:
            path = confinement.handle.path
            assert int(_read(f"{path}/memory.max")) == 64 * MiB
            assert _read(f"{path}/memory.swap.max") == "0"
            child = spawn(confinement.child_spec, allocate(200))
            assert child.receive() == {"started": True}
            assert child.receive() is None
            exit = child.wait()
            assert exit.signal == signal.SIGKILL
            reason = confinement.failure_reason(exit.code, exit.signal)
            assert reason is not None and reason.kind == "limit"
            assert reason.message.startswith("killed: memory limit 64 MiB, peak ")
            assert confinement.limit_events().oom_kills >= 1
        finally:
            confinement.close()

    def test_cpu_quota_holds_a_busy_loop(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(cpu_units=0.5)))
        try:
            assert _read(f"{confinement.handle.path}/cpu.max") == "50000 100000"
            child = spawn(confinement.child_spec, spin(2.0))
            report = child.receive()
            assert child.wait().code == 0
            usage = confinement.usage()
            # The busy loop's own CPU time over its wall time: the quota plus one period's slack
            # (the cgroup's total also holds the interpreter's start, before the loop).
            assert report["cpu"] / report["wall"] <= 0.55
            assert usage["cpu_seconds"] >= 0.95 * report["cpu"]  # the kernel charged it to this cgroup
            assert usage["nr_throttled"] > 0
        finally:
            confinement.close()

    def test_fork_bomb_is_contained(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(pids_max=16)))
        try:
            child = spawn(confinement.child_spec, fork_bomb)
            report = child.receive()
            exit = child.wait()
            assert exit.code == 3 and report["errno"] == 11
            assert 0 < len(confinement.handle.pids()) <= 16
            reason = confinement.failure_reason(exit.code, exit.signal)
            assert reason is not None and reason.message.startswith("pids limit 16 reached")
        finally:
            confinement.close()

    @pytest.mark.skipif(not DISK, reason="AGENT_GUEST_DISK names no scratch disk")
    def test_io_max_throttles_direct_writes(self, confiner):
        rate, total = 5 * MiB, 10 * MiB
        confinement = confiner.prepare(make_attempt(ResourceRequirements(io_write_bps=rate)))
        try:
            rdev = os.stat(DISK).st_rdev
            assert _read(f"{confinement.handle.path}/io.max").startswith(
                f"{os.major(rdev)}:{os.minor(rdev)} rbps=max wbps={rate} "
            )
            child = spawn(confinement.child_spec, direct_write(DISK, total))
            report = child.receive()
            assert child.wait().code == 0
            assert report["seconds"] >= 0.8 * total / rate  # bound from the limit
            assert confinement.usage()["io_write_bytes"] >= total
        finally:
            confinement.close()


class TestDelegation:
    """A supervisor in a non-root cgroup moves itself into a leaf before handing out controllers."""

    def test_supervisor_moves_into_a_leaf_and_still_enforces(self):
        base = f"/sys/fs/cgroup/agent-delegation-{os.getpid()}"
        os.mkdir(base)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the delegated supervisor
            code = 1
            try:
                with open(f"{base}/cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
                c = Confiner(gpu_minors=[])
                inside = _read(f"{c.backend.leaf}/cgroup.procs").split()
                confinement = c.prepare(make_attempt(ResourceRequirements(memory_mb=32)))
                child = spawn(confinement.child_spec, allocate(100))
                child.receive(), child.receive()
                exit = child.wait()
                reason = confinement.failure_reason(exit.code, exit.signal)
                confinement.close()
                c.close()
                ok = str(os.getpid()) in inside and reason is not None and "memory limit 32 MiB" in reason.message
                os.write(w, b"ok" if ok else repr((inside, reason)).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            verdict = f.read()
        _, status = os.waitpid(pid, 0)
        try:
            assert verdict == "ok" and os.WEXITSTATUS(status) == 0
        finally:
            from agent.supervisor.cgroups.v2 import _reap_tree

            _reap_tree(base)
        assert not os.path.exists(base)
