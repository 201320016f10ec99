"""Cgroups live exactly as long as their attempt; a dead supervisor's cgroups are reaped."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import signal

import psutil
import pytest

from agent.resources import ResourceRequirements
from agent.supervisor.cgroups import CgroupLimits
from agent.supervisor.cgroups.base import SupervisorName
from agent.supervisor.confinement import Confiner, SharedConfinement, restart_peak

from .helpers import (
    BACKEND,
    block,
    fork_bomb,
    leftover_cgroups,
    make_attempt,
    needs_cgroups,
    needs_v1,
    open_device,
    spawn,
)

pytestmark = [pytest.mark.cgroup, needs_cgroups]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _stale_supervisor_name() -> SupervisorName:
    """The name of a supervisor that is dead: an exited child's pid, a start time it never had."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    return SupervisorName(pid, 1)


def _tops(confiner: Confiner, root: str) -> list[str]:
    """The ``<root>`` directory in every hierarchy the confiner's backend uses."""
    if BACKEND == "v1":
        mounts = confiner.backend.mounts
        return sorted({f"{mounts[c]}/{root}" for c in confiner.backend.controllers})
    return [f"{confiner.backend.base}/{root}"]


def _fake_attempt_dirs(tops: list[str], supervisor: SupervisorName) -> list[str]:
    """Attempt directories as a supervisor named ``supervisor`` would have left them."""
    dirs = []
    for top in tops:
        path = f"{top}/{supervisor}/attempt-1"
        os.makedirs(path)
        dirs.append(path)
    return dirs


@pytest.fixture
def private_root(confiner):
    """A root directory name no other supervisor on this machine looks into."""
    root = f"agent-test-{secrets.token_hex(4)}"
    tops = _tops(confiner, root)
    yield root, tops
    for top in tops:
        for entry in os.listdir(top) if os.path.isdir(top) else ():
            path = f"{top}/{entry}"
            if os.path.isdir(path):
                for sub in os.listdir(path):
                    if os.path.isdir(f"{path}/{sub}"):
                        os.rmdir(f"{path}/{sub}")
                os.rmdir(path)
        if os.path.isdir(top):
            os.rmdir(top)


class TestWhereAProcessIs:
    """``holds(pid)``: whether a process is still in its cgroup (a worker's state, as root,
    may move it out; the worker must then serve no other state)."""

    def test_a_process_moved_out_is_no_longer_held(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        child = spawn(confinement.child_spec, block)
        pid = None
        try:
            pid = child.receive()["pid"]
            handle = confinement.handle
            assert handle.holds(pid)
            root = (f"{confiner.backend.mounts['memory']}" if BACKEND == "v1" else confiner.backend.mount)
            with open(f"{root}/cgroup.procs", "w") as procs:  # the hierarchy's root: no limits
                procs.write(str(pid))
            assert not handle.holds(pid)
            assert not handle.holds(os.getpid())  # this test's own process was never in it
        finally:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # out of the cgroup: closing it would not kill it
            confinement.close()
            child.wait()


class TestAttemptCleanup:
    """close() kills whatever the attempt left running, even processes that left its tree."""

    def test_close_kills_a_double_forked_grandchild_and_removes_the_cgroup(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        child = spawn(confinement.child_spec, block)
        pids = child.receive()
        assert set(confinement.handle.pids()) == {pids["pid"], pids["grandchild"]}
        assert leftover_cgroups(confiner)
        confinement.close()
        assert child.wait().signal == signal.SIGKILL
        assert _gone(pids["grandchild"])
        assert leftover_cgroups(confiner) == []

    def test_kill_empties_the_cgroup_and_close_is_idempotent(self, confiner):
        confinement = confiner.prepare(make_attempt(None))
        child = spawn(confinement.child_spec, block)
        child.receive()
        confinement.kill()
        assert confinement.handle.pids() == []
        assert child.wait().signal == signal.SIGKILL
        usage = confinement.usage()
        confinement.close()
        confinement.close()
        assert confinement.usage() == usage  # the last reading survives the cgroup


    @needs_v1
    def test_close_when_the_freezer_cgroup_went_first_kills_the_rest(self, confiner):
        # A process leaving while close() removes its cgroups: the freezer's rmdir found it
        # empty, another controller's still busy; what is left is killed without a freeze.
        confinement = confiner.prepare(make_attempt(None))
        child = spawn(confinement.child_spec, block)
        pids = child.receive()
        freezer = confinement.handle.dirs["freezer"]
        for pid in (pids["pid"], pids["grandchild"]):
            with open(f"{os.path.dirname(freezer)}/cgroup.procs", "w") as procs:
                procs.write(str(pid))
        os.rmdir(freezer)
        confinement.close()
        assert confinement.cleanup_error is None
        assert child.wait().signal == signal.SIGKILL
        assert _gone(pids["grandchild"])
        assert leftover_cgroups(confiner) == []

    @needs_v1
    def test_a_workers_cgroup_removed_under_its_open_files_is_no_error_and_no_change(self, confiner):
        # A worker that goes idle at once after its attempt's report is reaped, and its cgroup
        # removed by the zygote, before the supervisor reads that report: the files it holds
        # open answer ENODEV. Restarting the peak raised it (the run then hung), and every
        # limit file read as changed (a false warning).
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        handle = confinement.handle
        handle.remember_limits()
        restart_peak(handle)
        handle.reading()
        for path in handle.dirs.values():
            os.rmdir(path)  # as the zygote does: the worker is gone, its cgroups are empty
        with pytest.raises(OSError) as gone:
            os.pwrite(handle._files._fd(f"{handle.dirs['memory']}/memory.max_usage_in_bytes"), b"0", 0)
        assert gone.value.errno == errno.ENODEV
        restart_peak(handle)
        assert handle.limits_changed() == []
        confinement.close()
        assert confinement.cleanup_error is None
        assert leftover_cgroups(confiner) == []


class TestStaleReaping:
    """A new Confiner removes the cgroups of dead supervisors, and only those."""

    @pytest.mark.parametrize("frozen", [False, pytest.param(True, marks=needs_v1, id="left-frozen")])
    def test_dead_supervisors_cgroups_and_processes_are_reaped(self, private_root, frozen):
        root, tops = private_root
        dirs = _fake_attempt_dirs(tops, _stale_supervisor_name())
        child = spawn({"cgroup_procs": [f"{d}/cgroup.procs" for d in dirs]}, block)
        child.receive()
        if frozen:  # as a supervisor killed between freezing a cgroup and thawing it leaves it:
            # a frozen process never dies of SIGKILL
            freezer = next(d for d in dirs if "/freezer/" in d)
            with open(f"{freezer}/freezer.state", "w") as state:
                state.write("FROZEN")
        second = Confiner(root=root, gpu_minors=[])
        try:
            assert second.reaped == 1
        finally:
            second.close()
        assert child.wait().signal == signal.SIGKILL
        assert not [d for d in dirs if os.path.exists(os.path.dirname(d))]

    def test_a_cgroup_removed_while_its_pids_are_read_has_none(self, private_root, monkeypatch):
        # Two supervisors reaping the same dead one's tree: the other removes a cgroup
        # between this one's open and read of its cgroup.procs, and the kernel answers ENODEV.
        from agent.supervisor.cgroups import base

        root, tops = private_root

        def read_as_it_is_removed(path: str) -> str:
            doomed = f"{tops[0]}/doomed"
            os.makedirs(doomed)
            with open(f"{doomed}/cgroup.procs") as procs:
                os.rmdir(doomed)
                return procs.read()

        with pytest.raises(OSError) as dead:
            read_as_it_is_removed("")
        assert dead.value.errno == errno.ENODEV
        monkeypatch.setattr(base, "read", read_as_it_is_removed)
        assert base.read_pids(f"{tops[0]}/whatever/cgroup.procs") == []

    def test_a_live_supervisors_cgroups_are_left_alone(self, private_root):
        root, tops = private_root
        dirs = _fake_attempt_dirs(tops, SupervisorName.mine())  # same pid and start, another token
        second = Confiner(root=root, gpu_minors=[])
        second.close()
        assert second.reaped == 0
        assert all(os.path.isdir(d) for d in dirs)


@needs_v1
class TestUnenforcedLimits:
    """A limit asked for that this machine does not enforce is said, once per state."""

    def test_an_io_weight_without_bfq_is_said_once_per_state(self, confiner, caplog):
        weighted = ResourceRequirements(cpu_units=0.1, memory_mb=64, io_weight=500)
        first = confiner.prepare(make_attempt(weighted))
        try:
            if "io_weight" not in first.unenforced:
                pytest.skip("this disk uses bfq: IO weights are enforced")
            second = confiner.prepare(make_attempt(weighted))
            other = confiner.prepare(make_attempt(weighted, state="other"))
            second.close()
            other.close()
        finally:
            first.close()
        said = [r.getMessage() for r in caplog.records if "limit_not_enforced" in r.getMessage()]
        assert len(said) == 2, said  # "work" once, "other" once
        assert all("io_weight" in line and "bfq" in line for line in said)


class TestDevices:
    """The v1 devices cgroup hides the GPUs an attempt was not given."""

    def test_denied_device_cannot_be_opened(self, confiner):
        # A closed policy that allows only /dev/zero: /dev/null is denied.
        handle = confiner.backend.create("devices-test", CgroupLimits(allow_devices=("c 1:5 rwm",)))
        try:
            child = spawn(handle.child_spec(), open_device("/dev/null"))
            assert child.receive() == {"errno": errno.EPERM}
            assert child.wait().code == 0
        finally:
            handle.remove()

    def test_only_the_assigned_gpu_minors_are_allowed(self, tmp_path):
        confiner = Confiner(io_paths=[str(tmp_path)], gpu_minors=[0, 1, 2])
        try:
            for minor in (0, 1):
                os.mknod(tmp_path / f"nvidia{minor}", 0o600 | 0o020000, os.makedev(195, minor))
            attempt = make_attempt(None, assignment={"gpus": ["GPU-1111"], "gpu_minors": [1]})
            confinement = confiner.prepare(attempt)
            try:
                allowed_gpus = {r for r in confinement.limits.allow_devices if r.startswith("c 195:")}
                assert allowed_gpus == {"c 195:1 rwm", "c 195:254 rwm", "c 195:255 rwm"}  # GPU 1 + control nodes
                with open(f"{confinement.handle.dirs['devices']}/devices.list") as f:
                    listed = {line.strip() for line in f if line.startswith("c 195:")}
                assert listed == allowed_gpus
                assert confinement.child_spec["gpu"]["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-1111"
                denied = spawn(confinement.child_spec, open_device(str(tmp_path / "nvidia0")))
                allowed = spawn(confinement.child_spec, open_device(str(tmp_path / "nvidia1")))
                assert denied.receive() == {"errno": errno.EPERM}
                assert allowed.receive()["errno"] != errno.EPERM  # ENXIO without a driver
                denied.wait(), allowed.wait()
            finally:
                confinement.close()
        finally:
            confiner.close()


class TestProcessExit:
    """A supervisor that exits without closing still leaves no cgroups behind."""

    def test_cgroups_are_removed_at_interpreter_exit(self, confiner):
        import json
        import subprocess
        import sys

        code = (
            "import json\n"
            "from agent.supervisor.confinement import Confiner\n"
            "from tests.cgroups.helpers import make_attempt\n"
            "c = Confiner(gpu_minors=[])\n"
            "c.prepare(make_attempt(None))\n"
            "print(json.dumps(c.backend.owned_dirs()))\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
        dirs = json.loads(done.stdout)
        assert dirs and not [d for d in dirs if os.path.exists(d)]


@needs_v1
class TestCoMountedHierarchies:
    """Controllers mounted together (cpu,cpuacct) share one directory per attempt."""

    def test_create_and_remove_with_a_shared_mount(self):
        from agent.supervisor.cgroups.v1 import V1Backend, v1_mounts

        mounts = dict(v1_mounts())
        mounts["cpuacct"] = mounts["cpu"]
        backend = V1Backend(root=f"agent-test-{secrets.token_hex(4)}", mounts=mounts)
        try:
            handle = backend.create("shared", CgroupLimits(cpu_quota_us=50_000))
            assert handle.dirs["cpu"] == handle.dirs["cpuacct"]
            assert len(handle.procs_files) == len(set(handle.dirs.values()))
            handle.remove()
            assert not os.path.exists(handle.dirs["cpu"])
        finally:
            backend.close()
            for top in {os.path.dirname(d) for d in backend.owned_dirs()}:
                os.rmdir(top)


@needs_v1
class TestJoinedHierarchies:
    """An attempt joins the cpu hierarchy only for a quota: a directory there limits nothing."""

    def test_cpu_only_with_a_quota(self, confiner):
        plain = confiner.prepare(make_attempt(None))
        quota = confiner.prepare(make_attempt(ResourceRequirements(cpu_units=0.5, memory_mb=64)))
        try:
            assert "cpu" not in plain.handle.dirs and "cpuacct" in plain.handle.dirs
            assert os.path.isdir(quota.handle.dirs["cpu"])
            child = spawn(plain.child_spec, block)
            pids = child.receive()
            with open(f"/proc/{pids['pid']}/cgroup") as fh:
                paths = {line.split(":")[1]: line.strip().split(":", 2)[2] for line in fh}
            name = os.path.basename(plain.handle.dirs["memory"])
            assert paths["memory"].endswith(name) and paths["cpuacct"].endswith(name)
            assert not paths["cpu"].endswith(name)
            plain.kill()
            assert child.wait().signal == signal.SIGKILL
            usage = plain.usage()
            assert usage["nr_throttled"] == 0 and usage["throttled_seconds"] == 0
            assert plain.limit_events().nr_throttled == 0
        finally:
            plain.close()
            quota.close()


    @pytest.mark.parametrize("to_mib", [1024, 64])
    def test_a_memory_limit_can_be_raised_and_lowered(self, confiner, to_mib):
        # memory+swap may never be below memory: a parked child's cgroup, made with a
        # default, is given an attempt's limit above it or below it.
        backend = confiner.backend
        handle = backend.create(f"raise-{secrets.token_hex(3)}", CgroupLimits(memory_bytes=512 << 20))
        try:
            backend.apply(handle, CgroupLimits(memory_bytes=to_mib << 20))
            for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
                path = os.path.join(handle.dirs["memory"], name)
                if os.path.exists(path):
                    with open(path) as fh:
                        assert int(fh.read()) == to_mib << 20, name
        finally:
            handle.remove()


class TestNestedCgroups:
    """Cgroups an attempt made below its own (a nested supervisor, a container) go with it."""

    def test_remove_kills_and_deletes_what_the_attempt_nested(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(memory_mb=64)))
        handle = confinement.handle
        tops = sorted(set(handle.dirs.values())) if BACKEND == "v1" else [handle.path]
        nested = [f"{top}/nested" for top in tops]
        for path in nested:
            os.mkdir(path)
        child = spawn({"cgroup_procs": [f"{p}/cgroup.procs" for p in nested]}, block)
        pids = child.receive()
        confinement.close()
        assert confinement.cleanup_error is None
        assert child.wait().signal == signal.SIGKILL
        assert _gone(pids["grandchild"])
        assert not [p for p in tops if os.path.exists(p)]


class TestWorkerFirstAttempt:
    """A worker's first attempt is charged the limits its worker hit as it started only
    when the worker died: else a refused fork at its start is not the attempt's doing."""

    def test_limits_hit_before_the_first_attempt(self, confiner):
        confinement = confiner.prepare(make_attempt(ResourceRequirements(pids_max=4)))
        # Its children fork no more: a refusal of theirs could come after the report, in the attempt.
        child = spawn(confinement.child_spec, functools.partial(fork_bomb, most=10, then_wait=True, spread=False))
        assert child.receive()["errno"] == errno.EAGAIN  # the worker's start had forks refused
        first = SharedConfinement(confinement)  # its first attempt begins now
        assert first.limit_events().pids_limit_hits == 0
        assert first.failure_reason(None, None) is None  # the attempt raised: not a limit's doing
        confinement.kill()  # the worker dies during the attempt
        assert child.wait().signal == signal.SIGKILL
        reason = first.failure_reason(None, signal.SIGKILL)
        assert reason is not None and reason.details["limit"] == "pids"
        confinement.close()
