"""``agent doctor`` tells the truth about this machine."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from agent.supervisor.doctor import (
    CgroupMount,
    Report,
    choose_backend,
    diagnose,
    main,
    parse_mountinfo,
    render,
)
from agent.devices import GPUDevice, StaticInventory, machine_inventory
from agent.supervisor.sandbox import DEFAULT_UIDS, UidPool

HERE_V1 = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
COMOUNTED = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
V2_ONLY = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def leftover_probe_cgroups() -> list[str]:
    return glob.glob("/sys/fs/cgroup/*/agent-doctor-*") + glob.glob("/sys/fs/cgroup/agent-doctor-*")


def sandbox_processes() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["uids"])
        if p.info["uids"] is not None and p.info["uids"].real in DEFAULT_UIDS
    ]


@pytest.fixture(scope="module")
def report() -> Iterator[Report]:
    before = set(glob.glob("/tmp/agent-sandbox-*"))
    yield diagnose()
    assert set(glob.glob("/tmp/agent-sandbox-*")) <= before


class TestBackendChoice:
    """The backend follows the mounted hierarchies."""

    def test_v1_hierarchies_are_parsed(self) -> None:
        mounts = parse_mountinfo(HERE_V1)
        assert [m.controllers for m in mounts if m.version == 1] == [("cpu",), ("cpuacct",), ("memory",), ("pids",)]
        assert [m.mountpoint for m in mounts if m.version == 2] == ["/sys/fs/cgroup/unified"]

    def test_comounted_controllers_share_a_mount(self) -> None:
        assert parse_mountinfo(COMOUNTED) == [CgroupMount(1, "/sys/fs/cgroup/cpu,cpuacct", ("cpu", "cpuacct"))]

    def test_hybrid_with_a_bare_unified_mount_is_v1(self) -> None:
        mounts = parse_mountinfo(HERE_V1)
        mounts = [m if m.version == 1 else CgroupMount(2, m.mountpoint, ("hugetlb",)) for m in mounts]
        backend, reason = choose_backend(mounts)
        assert backend == "v1"
        assert "has hugetlb" in reason

    def test_unified_with_controllers_is_v2(self) -> None:
        mounts = [CgroupMount(2, "/sys/fs/cgroup", ("cpuset", "cpu", "io", "memory", "pids"))]
        assert choose_backend(parse_mountinfo(V2_ONLY))[0] == "none"  # controllers unknown yet
        assert choose_backend(mounts)[0] == "v2"

    def test_no_cgroups_falls_back_and_says_so(self) -> None:
        backend, reason = choose_backend([])
        assert backend == "none"
        assert "rlimits and a watchdog" in reason

    def test_forced_backend_is_reported(self) -> None:
        mounts = parse_mountinfo(HERE_V1)
        forced = choose_backend(mounts)[1] + " (forced by AGENT_CGROUP_BACKEND=v1)"
        assert choose_backend(mounts, "v1") == ("v1", forced)
        backend, reason = choose_backend(mounts, "v2")
        assert backend == "none" and "unset AGENT_CGROUP_BACKEND" in reason
        assert choose_backend(mounts, "none")[0] == "none"

    def test_forced_off_probes_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AGENT_CGROUP_BACKEND", "none")
        got = diagnose(sandbox=False, inventory=StaticInventory([]))
        assert got.cgroup_backend == "none"
        assert "turns cgroups off" in got.cgroup_reason
        assert not any(limit.enforceable for limit in got.limits)

    def test_nothing_mounted_reports_nothing_enforceable(self) -> None:
        gpu = GPUDevice(0, "GPU-abc", "Test GPU", 1024, "00000000:01:00.0", 0)
        got = diagnose(mountinfo="", sandbox=False, inventory=StaticInventory([gpu]))
        assert got.cgroup_backend == "none"
        assert not any(limit.enforceable for limit in got.limits)
        assert got.gpus == [gpu] and got.gpu_reason is None
        assert "GPU-abc" in render(got)


@pytest.mark.cgroup
@pytest.mark.skipif(os.geteuid() != 0, reason="probing cgroups needs root")
class TestDiagnoseThisMachine:
    """On this machine (cgroup v1, no GPU driver) the report matches what the kernel does."""

    def test_backend_is_v1(self, report: Report) -> None:
        if not os.path.isdir("/sys/fs/cgroup/memory"):
            pytest.skip("not a cgroup v1 machine")
        assert report.cgroup_backend == "v1"
        assert "cgroup v1" in report.cgroup_reason

    @pytest.mark.parametrize("name", ["memory", "cpu", "pids"])
    def test_core_limits_are_enforceable(self, report: Report, name: str) -> None:
        assert report.limit(name).enforceable, report.limit(name)

    def test_io_weight_follows_the_disk_scheduler(self, report: Report) -> None:
        schedulers = []
        for path in glob.glob("/sys/block/*/queue/scheduler"):
            if not os.path.basename(os.path.dirname(os.path.dirname(path))).startswith(("loop", "ram", "zram")):
                schedulers.append(open(path).read())
        on_bfq = any("[bfq]" in s for s in schedulers)
        assert report.limit("io_weight").enforceable is on_bfq
        if not on_bfq:
            assert "bfq" in report.limit("io_weight").detail

    def test_zero_gpus_with_the_nvml_reason(self, report: Report) -> None:
        if machine_inventory().devices():
            pytest.skip("this machine has GPUs")
        assert report.gpus == []
        assert "NVML library not found" in (report.gpu_reason or "")

    def test_sandbox_is_available_as_root(self, report: Report) -> None:
        assert report.sandbox_available, report.sandbox
        assert {c.name for c in report.sandbox} >= {
            "network namespace", "pid namespace", "filesystem", "keyring", "seccomp", "uid range", "enter",
            "interpreter",
        }

    def test_a_missing_ingredient_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where the seccomp filter has no system call table, the report says so, and no sandbox."""
        from agent.runtime import seccomp

        monkeypatch.setattr(seccomp, "machine", lambda: "riscv64")
        checks = {c.name: c for c in diagnose(inventory=StaticInventory([])).sandbox}
        assert not checks["seccomp"].ok and "riscv64" in checks["seccomp"].detail
        assert not checks["enter"].ok
        assert checks["network namespace"].ok and checks["pid namespace"].ok

    def test_probing_leaves_nothing_behind(self, report: Report) -> None:
        assert leftover_probe_cgroups() == []
        assert sandbox_processes() == []

    def test_render_names_every_finding(self, report: Report) -> None:
        text = render(report)
        assert text.startswith(f"cgroups: {report.cgroup_backend}")
        for limit in report.limits:
            assert limit.name in text
        assert "versions:" in text and "uvloop" in text and "pyzmq" in text


@pytest.mark.cgroup
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to lease a uid")
class TestCommandLine:
    """``agent doctor`` prints text or JSON, and tells the truth without root."""

    def test_json_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["cgroup_backend"] in ("v1", "v2")
        assert {limit["name"] for limit in data["limits"]} >= {"memory", "cpu", "pids"}
        assert "libzmq" in data["versions"]

    def test_agent_cli_passes_options_to_doctor(self, capsys: pytest.CaptureFixture[str]) -> None:
        from agent.cli import main as agent_main

        assert agent_main(["doctor", "--json"]) == 0
        assert "cgroup_backend" in json.loads(capsys.readouterr().out)

    def test_text_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main([]) == 0
        assert capsys.readouterr().out.startswith("cgroups: ")

    def test_unprivileged_user_gets_no_cgroups_and_no_sandbox(self) -> None:
        pool = UidPool()
        lease = pool.lease("doctor-test")
        try:
            root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
            done = subprocess.run(
                [sys.executable, "-m", "agent.supervisor.doctor", "--json"],
                user=lease.uid, group=lease.uid, extra_groups=[], cwd="/",
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.path.abspath(root)},
                capture_output=True, text=True, timeout=120, check=False,
            )
        finally:
            pool.close()
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["cgroup_backend"] == "none"
        assert "creating cgroups failed" in data["cgroup_reason"]
        assert data["sandbox_available"] is False
        assert "not root" in data["sandbox"][0]["detail"]
        assert leftover_probe_cgroups() == []
