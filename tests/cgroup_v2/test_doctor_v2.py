"""`agent doctor` tells the truth on a cgroup v2 machine (run inside the guest)."""

from __future__ import annotations

import pytest

from agent.supervisor.doctor import diagnose
from tests.cgroups.helpers import BACKEND

pytestmark = [pytest.mark.guest, pytest.mark.skipif(BACKEND != "v2", reason="needs root on cgroup v2")]


class TestDoctorOnV2:
    """The report names v2 and the limits the unified hierarchy really enforces."""

    def test_backend_and_enforceable_limits(self):
        report = diagnose()
        assert report.cgroup_backend == "v2"
        enforceable = {limit.name for limit in report.limits if limit.enforceable}
        assert {"cpu", "memory", "pids", "io_throttle"} <= enforceable
        devices = {limit.name: limit for limit in report.limits}.get("devices")
        assert devices is None or not devices.enforceable  # v2 needs eBPF for device rules
        assert report.gpus == [] and report.gpu_reason
