"""agentd's per-job cgroup on cgroup v2: delegated to the job's uid, whose own supervisor confines below it.

Runs in the v2 guest (``.ci/guest-tests``); the v1 path is proven end to end by tests/daemon.
"""

from __future__ import annotations

import os

import pytest

from agent.daemon.jobcgroups import JobCgroups
from tests.cgroups.helpers import BACKEND

pytestmark = [pytest.mark.guest, pytest.mark.skipif(BACKEND != "v2", reason="needs root on cgroup v2")]

UID = 3199  # the job's user: only ownership matters, no account is needed


def _supervise_as_the_user(procs: list[str]) -> int:
    """A forked child: join the job's cgroup as root, become UID, confine one attempt below it."""
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:
        for path in procs:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        os.setgroups([])
        os.setresgid(UID, UID, UID)
        os.setresuid(UID, UID, UID)
        from agent.resources import ResourceRequirements
        from agent.supervisor.confinement import Confiner
        from tests.cgroups.helpers import make_attempt

        confiner = Confiner(gpu_minors=[])
        assert confiner.backend_name == "v2", confiner.refused
        confinement = confiner.prepare(make_attempt(ResourceRequirements(cpu_units=0.5, memory_mb=64)))
        [attempt_procs] = confinement.child_spec["cgroup_procs"]
        child = os.fork()
        if child == 0:
            with open(attempt_procs, "w") as f:
                f.write(str(os.getpid()))
            os._exit(0)
        os.waitpid(child, 0)
        with open(attempt_procs.replace("cgroup.procs", "memory.max")) as f:
            assert int(f.read()) == 64 * 1024 * 1024
        confinement.close()
        confiner.close()
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()  # pytest shows the child's stderr with the failure
    finally:
        os._exit(code)


def test_a_job_cgroup_is_delegated_and_its_user_confines_below_it() -> None:
    cgroups = JobCgroups(prefer="v2")
    job = cgroups.create("1", UID, UID, {"memory_mb": 256, "cpu": 1}, pids_max=512)
    try:
        [path] = job.dirs
        for name in ("", "/cgroup.procs", "/cgroup.subtree_control", "/cgroup.threads"):
            assert os.stat(path + name).st_uid == UID, name
        assert os.stat(f"{path}/memory.max").st_uid == 0  # the ceilings stay root's
        with open(f"{path}/memory.max") as f:
            assert int(f.read()) == 256 * 1024 * 1024
        assert _supervise_as_the_user(job.procs_files) == 0
    finally:
        job.remove()
        cgroups.close()
    assert not os.path.exists(path)
