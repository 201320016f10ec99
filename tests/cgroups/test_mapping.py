"""ResourceRequirements map to kernel limits, and the child spec carries what the child needs."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from agent.errors import ResourceRequestError
from agent.executor import Isolation
from agent.resources import ResourceRequirements, ResourceType
from agent.supervisor.cgroups import DEFAULT_PIDS_MAX, SANDBOX_PIDS_MAX, IoThrottle, limits_for
from agent.supervisor.cgroups.base import SupervisorName, safe_name
from agent.supervisor.confinement import Confiner

from .helpers import BACKEND, allocate, fork_bomb, make_attempt, spawn

MiB = 1024 * 1024
DISK = ((254, 0),)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class TestLimitsFor:
    """Each field becomes the kernel setting the docs promise."""

    def test_cpu_memory_and_pids(self):
        limits = limits_for(ResourceRequirements(cpu_units=0.5, memory_mb=64))
        assert (limits.cpu_quota_us, limits.cpu_period_us) == (50_000, 100_000)
        assert limits.memory_bytes == 64 * MiB
        assert limits.pids_max == DEFAULT_PIDS_MAX

    def test_tiny_cpu_share_is_raised_to_the_kernel_minimum(self):
        assert limits_for(ResourceRequirements(cpu_units=0.001)).cpu_quota_us == 1_000

    def test_requests_past_what_a_cgroup_can_say_get_its_most(self):
        # The kernel refuses a larger quota, and cuts a larger memory limit to 64 bits: a
        # request above every core and byte of any box is no limit, never a refusal.
        limits = limits_for(ResourceRequirements(cpu_units=1e20, memory_mb=1e200))
        assert limits.cpu_quota_us == (1 << 44) - 1
        assert limits.memory_bytes == (1 << 63) - 4096

    def test_zero_means_unlimited(self):
        limits = limits_for(ResourceRequirements(cpu_units=0, memory_mb=0))
        assert limits.cpu_quota_us is None and limits.memory_bytes is None

    def test_types_left_out_of_resource_types_are_not_limited(self):
        limits = limits_for(ResourceRequirements(memory_mb=64, resource_types=ResourceType.CPU))
        assert limits.memory_bytes is None and limits.cpu_quota_us == 100_000

    def test_io_throttles_apply_to_each_disk(self):
        limits = limits_for(ResourceRequirements(io_write_bps=5 * MiB, io_read_iops=10), io_devices=DISK)
        assert limits.io_throttles == (IoThrottle(254, 0, None, 5 * MiB, 10, None),)
        assert limits_for(ResourceRequirements(), io_devices=DISK).io_throttles == ()

    def test_io_weight_scales_from_the_default(self):
        assert limits_for(ResourceRequirements(io_weight=1.0), io_devices=DISK).io_weight is None
        assert limits_for(ResourceRequirements(io_weight=2.5), io_devices=DISK).io_weight == 250
        assert limits_for(ResourceRequirements(io_weight=50), io_devices=DISK).io_weight == 1000

    def test_pids_defaults(self):
        assert limits_for(None).pids_max == DEFAULT_PIDS_MAX
        assert limits_for(None, sandbox=True).pids_max == SANDBOX_PIDS_MAX
        assert limits_for(ResourceRequirements(pids_max=7), sandbox=True).pids_max == 7

    def test_a_sandbox_is_limited_even_without_requirements(self):
        bare = limits_for(None, sandbox=True)
        assert (bare.cpu_units, bare.memory_mib, bare.pids_max) == (1.0, 512, 128)
        trusted = limits_for(None)
        assert (trusted.cpu_units, trusted.memory_mib) == (None, None)
        # Declared limits win; undeclared types get the sandbox's defaults.
        cpu_only = limits_for(ResourceRequirements(cpu_units=2, memory_mb=64, resource_types=ResourceType.CPU),
                              sandbox=True)
        assert (cpu_only.cpu_units, cpu_only.memory_mib) == (2.0, 512)

    def test_memory_too_small_for_a_process_is_refused(self):
        with pytest.raises(ResourceRequestError, match="too small"):
            limits_for(ResourceRequirements(memory_mb=0.1))


class TestNames:
    """Names are safe directory names and tell whether their supervisor lives."""

    def test_safe_name(self):
        assert safe_name("../etc/passwd x") == "_etc_passwd_x"
        assert len(safe_name("s" * 500)) == 100

    def test_supervisor_name_round_trip_and_liveness(self):
        mine = SupervisorName.mine()
        parsed = SupervisorName.parse(str(mine))
        assert parsed == mine and parsed.alive()
        assert not SupervisorName(mine.pid, mine.start + 1).alive()  # pid reused: not alive
        assert SupervisorName.parse("not-a-supervisor") is None

    def test_a_supervisor_that_exited_is_not_alive_before_its_parent_collects_it(self):
        import subprocess
        import sys

        def stat(pid: int) -> list[bytes]:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                return fh.read().rsplit(b")", 1)[1].split()

        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        try:
            name = SupervisorName(proc.pid, int(stat(proc.pid)[19]))
            while stat(proc.pid)[0] != b"Z":  # until it has exited; its parent (here) has not collected it
                os.sched_yield()
            assert not name.alive()  # a killed agentd whose parent is slow left its cgroups to nobody
        finally:
            proc.wait()


class TestNoCgroupBackend:
    """Without cgroups a watchdog enforces memory and pids, and says what it cannot enforce."""

    @pytest.fixture
    def confiner(self):
        c = Confiner("none", gpu_minors=[])
        yield c
        c.close()

    def test_spec_pins_no_gpu_and_sets_a_data_backstop(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64, cpu_units=0.5)))
        try:
            assert confinement.child_spec["gpu"]["env"]["CUDA_VISIBLE_DEVICES"] == ""
            assert confinement.child_spec["data_headroom"] == 128 * MiB
            assert "cpu_units" in confinement.unenforced
            assert "watchdog" in confiner.capabilities()["memory_mb"]
        finally:
            confinement.close()

    def test_watchdog_kills_a_child_over_its_memory(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        try:
            child = spawn(confinement.child_spec, allocate(100))
            confinement.started(child.pid)
            assert child.receive() == {"started": True}
            while (message := child.receive()) is not None:  # killed while allocating or waiting
                assert message == {"allocated": 100 * MiB}
            exit = child.wait()
            assert exit.signal == signal.SIGKILL
            reason = confinement.failure_reason(exit.code, exit.signal)
            assert reason is not None and reason.kind == "limit"
            assert reason.message.startswith("killed: memory limit 64 MiB (watchdog), peak ")
        finally:
            confinement.close()

    def test_watchdog_kills_a_tree_with_too_many_processes(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(pids_max=8)))
        try:
            child = spawn(confinement.child_spec, lambda ch: fork_bomb(ch, most=20, then_wait=True))
            confinement.started(child.pid)
            while child.receive() is not None:  # the bomb's report, then silence until killed
                pass
            exit = child.wait()
            assert exit.signal == signal.SIGKILL
            reason = confinement.failure_reason(exit.code, exit.signal)
            assert reason is not None and reason.kind == "limit"
            assert reason.message.startswith("killed: pids limit 8 exceeded (watchdog saw ")
            assert confinement.handle.pids() == []
        finally:
            confinement.close()
        # Orphans left the tree but not the child's process group: they were killed too.
        group = [p for p in psutil.process_iter() if _pgid(p.pid) == child.pid]
        _, alive = psutil.wait_procs(group, timeout=5)
        assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []

    def test_sandbox_isolation_without_its_module_or_root_is_refused_clearly(self, confiner):
        pytest.importorskip("agent.supervisor.sandbox")
        attempt = make_attempt(None, isolation=Isolation.SANDBOX)
        if os.geteuid() == 0:
            confinement = confiner.prepare(attempt)
            try:
                assert confinement.child_spec["sandbox"]["uid"] > 0
                assert confinement.limits.pids_max == SANDBOX_PIDS_MAX
                # RLIMIT_NPROC above pids.max: the cgroup refuses the fork first, and says so.
                assert confinement.child_spec["sandbox"]["rlimits"]["nproc"] == SANDBOX_PIDS_MAX + 1
            finally:
                confinement.close()
        else:
            from agent.errors import IsolationUnavailableError

            with pytest.raises(IsolationUnavailableError, match="root"):
                confiner.prepare(attempt)

    @pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root")
    def test_a_sandboxed_attempt_takes_over_the_last_uid_leased_ahead(self, confiner, monkeypatch):
        """The uid leased ahead for a parked child is the attempt's when no other is left (a
        launch may take a parked child that has none while a younger one holds the last)."""
        from agent.supervisor.parked import Parked
        from agent.supervisor.sandbox import UIDS_ENV

        uid = 233000 + os.getpid() % 1000
        monkeypatch.setenv(UIDS_ENV, f"{uid}-{uid}")
        ahead = confiner.lease_ahead(os.getpid())
        assert ahead is not None and ahead.uid == uid
        confinement = confiner.prepare(make_attempt(None, isolation=Isolation.SANDBOX))
        try:
            assert confinement.child_spec["sandbox"]["uid"] == uid
            confiner.let_go(Parked(os.getpid(), None, ahead))  # its parked child let go meanwhile
            leased = confiner._uid_pool.leased()
            assert ahead.owner not in leased and list(leased.values()) == [uid]
        finally:
            confinement.close()
        assert confiner._uid_pool.leased() == {}


class TestDetection:
    """The best usable backend is chosen; a forced one that cannot work is an error, not a fallback."""

    def test_forced_unknown_backend_is_refused(self):
        from agent.errors import IsolationUnavailableError
        from agent.supervisor.cgroups import detect

        with pytest.raises(IsolationUnavailableError, match="use one of v2, v1, none"):
            detect(prefer="v3")

    def test_forced_unusable_backend_says_why(self, monkeypatch):
        from agent.errors import IsolationUnavailableError
        from agent.supervisor.cgroups import BACKEND_ENV, detect

        unusable = "v1" if BACKEND == "v2" else "v2"
        monkeypatch.setenv(BACKEND_ENV, unusable)
        with pytest.raises(IsolationUnavailableError, match=f"cgroup backend '{unusable}' is not usable here"):
            detect()

    def test_describe_names_the_backend_and_what_it_enforces(self):
        from agent.supervisor.cgroups import describe

        report = describe()
        assert report["backend"] == (BACKEND or "none")
        assert {"cpu_units", "memory_mb", "pids_max"} <= set(report["enforces"])
