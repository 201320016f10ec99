"""Limits are enforced by the kernel: children that try to break them are stopped and reported."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from agent.errors import FailureReason
from agent.resources import ResourceRequirements

from .helpers import (
    allocate,
    direct_write,
    fork_bomb,
    make_attempt,
    needs_cgroups,
    needs_v1,
    spawn,
    spin,
)

pytestmark = [pytest.mark.cgroup, needs_cgroups]

MiB = 1024 * 1024


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


class TestMemoryLimit:
    """memory_mb is a hard limit: a child allocating past it is OOM-killed and the reason says so."""

    def test_child_over_the_limit_is_killed_and_reported(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        try:
            child = spawn(confinement.child_spec, allocate(200))
            assert child.receive() == {"started": True}
            assert child.receive() is None  # died before it could report the allocation
            exit = child.wait()
            assert exit.signal == signal.SIGKILL
            reason = confinement.failure_reason(exit.code, exit.signal)
            assert isinstance(reason, FailureReason)
            assert reason.kind == "limit"
            assert reason.message == "killed: memory limit 64 MiB, peak 64 MiB"
            assert reason.details["limit"] == "memory"
            assert reason.details["oom_kills"] >= 1
            assert confinement.usage()["peak_memory_bytes"] <= 64 * MiB
        finally:
            confinement.close()

    def test_child_under_the_limit_runs_and_no_reason_is_made_up(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        try:
            child = spawn(confinement.child_spec, allocate(16))
            assert child.receive() == {"started": True}
            assert child.receive() == {"allocated": 16 * MiB}
            child.release()
            exit = child.wait()
            assert (exit.code, exit.signal) == (0, None)
            assert confinement.failure_reason(exit.code, exit.signal) is None
            assert confinement.failure_reason(1, None) is None  # a plain failure is not a limit
            assert confinement.usage()["peak_memory_bytes"] >= 16 * MiB
        finally:
            confinement.close()

    @needs_v1
    def test_v1_files_hold_the_limit_with_swap_off(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        try:
            memory = confinement.handle.dirs["memory"]
            assert int(_read(f"{memory}/memory.limit_in_bytes")) == 64 * MiB
            assert int(_read(f"{memory}/memory.memsw.limit_in_bytes")) == 64 * MiB
        finally:
            confinement.close()


class TestCpuQuota:
    """cpu_units is a CFS quota: a busy loop gets no more than its share of CPU time."""

    def test_half_a_core_is_held_to_half_a_core(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(cpu_units=0.5)))
        try:
            child = spawn(confinement.child_spec, spin(2.0))
            report = child.receive()
            assert child.wait().code == 0
            usage = confinement.usage()
            # The busy loop's own CPU time over its wall time: the quota plus one period's slack
            # (the cgroup's total also holds the interpreter's start, before the loop).
            assert report["cpu"] / report["wall"] <= 0.55
            assert usage["cpu_seconds"] >= 0.95 * report["cpu"]  # the kernel charged it to this cgroup
            assert usage["nr_throttled"] > 0
            assert usage["throttled_seconds"] > 0
            assert confinement.failure_reason(0, None) is None
        finally:
            confinement.close()

    @needs_v1
    def test_v1_quota_file(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(cpu_units=0.5)))
        try:
            cpu = confinement.handle.dirs["cpu"]
            assert _read(f"{cpu}/cpu.cfs_quota_us") == "50000"
            assert _read(f"{cpu}/cpu.cfs_period_us") == "100000"
        finally:
            confinement.close()


class TestPidsLimit:
    """pids_max contains a fork bomb, is reported, and every bomb process dies with the attempt."""

    def test_fork_bomb_is_contained_reported_and_cleaned_up(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(pids_max=32)))
        try:
            child = spawn(confinement.child_spec, fork_bomb)
            report = child.receive()
            exit = child.wait()
            assert exit.code == 3
            assert report["errno"] == 11  # EAGAIN: the kernel refused the fork
            assert report["forked"] < 32
            survivors = confinement.handle.pids()
            assert survivors and len(survivors) <= 32
            reason = confinement.failure_reason(exit.code, exit.signal)
            assert reason is not None and reason.kind == "limit"
            assert reason.message.startswith("pids limit 32 reached")
            assert reason.details["refused"] >= 1
        finally:
            confinement.close()
        for pid in survivors:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    def test_default_pids_limit_applies_without_requirements(self, confiner):
        confinement = confiner.prepare(make_attempt(None))
        try:
            assert confinement.limits.pids_max == 4096
            assert confinement.limits.memory_bytes is None
        finally:
            confinement.close()


class TestIoThrottle:
    """io_write_bps throttles direct writes on the disk of the working directory."""

    def test_direct_write_is_held_to_the_byte_rate(self, confiner, tmp_path):
        rate, total = 5 * MiB, 10 * MiB
        confinement = confiner.prepare(make_attempt(ResourceRequirements(io_write_bps=rate)))
        try:
            child = spawn(confinement.child_spec, direct_write(str(tmp_path / "data"), total))
            report = child.receive()
            assert child.wait().code == 0
            assert report["written"] == total
            # Correctness bound from the limit (10 MiB at 5 MiB/s), not a speed measurement.
            assert report["seconds"] >= 0.8 * total / rate
            assert confinement.usage()["io_write_bytes"] >= total
        finally:
            confinement.close()
        os.unlink(tmp_path / "data")

    @needs_v1
    def test_v1_throttle_file_names_the_disk(self, confiner, tmp_path):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(io_write_bps=5 * MiB, io_read_iops=100)))
        try:
            blkio = confinement.handle.dirs["blkio"]
            dev = os.stat(tmp_path).st_dev
            disk = f"{os.major(dev)}:{os.minor(dev)}"
            assert _read(f"{blkio}/blkio.throttle.write_bps_device") == f"{disk} {5 * MiB}"
            assert _read(f"{blkio}/blkio.throttle.read_iops_device") == f"{disk} 100"
        finally:
            confinement.close()

    @needs_v1
    def test_io_weight_on_a_disk_without_bfq_is_reported_not_faked(self, confiner, tmp_path):
        from agent.supervisor.cgroups import blockdev

        dev = os.stat(tmp_path).st_dev
        if blockdev.scheduler(os.major(dev), os.minor(dev)) == "bfq":
            pytest.skip("this disk uses bfq, which does enforce weights")
        confinement = confiner.prepare(make_attempt(ResourceRequirements(io_weight=5.0)))
        try:
            assert "io_weight" in confinement.unenforced
            assert "bfq" in confinement.unenforced["io_weight"]
        finally:
            confinement.close()
