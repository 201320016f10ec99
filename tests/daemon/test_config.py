"""agentd.toml: documented defaults without it, clear errors for a bad one, per-user quotas and ceilings enforced."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent._types import Priority
from agent.daemon.config import ROOT_POLICY, DaemonConfig, UserPolicy, load_config, parse_config
from agent.errors import DaemonConfigError

from .helpers import AGENTD, Agentd, User, shared_file, wait_until, write_workflow


class TestParsing:
    """Every key is optional; every mistake names itself."""

    def test_defaults_without_a_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("agent.daemon.config.DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
        config = load_config()
        assert config == DaemonConfig()
        assert config.policy_for(0) == ROOT_POLICY and ROOT_POLICY.priority_ceiling is Priority.CRITICAL
        nobody = config.policy_for(65534)
        assert nobody.priority_ceiling is Priority.HIGH and nobody.default_priority is Priority.NORMAL
        assert nobody.quota == {} and config.is_admin(0, 0) and not config.is_admin(65534, 65534)

    def test_user_sections_override_the_defaults(self) -> None:
        config = parse_config({
            "max_running_jobs": 8,
            "pool": {"cpu": 4, "memory_mb": 1024, "preemption": False},
            "users": {"default": {"cpu": 2, "max_running_jobs": 3},
                      "nobody": {"priority_ceiling": "critical", "gpu": 1}},
        })
        assert (config.pool_cpu, config.pool_memory_mb, config.preemption) == (4.0, 1024.0, False)
        assert config.policy_for(65534) == UserPolicy(priority_ceiling=Priority.CRITICAL, max_running_jobs=3,
                                                      quota={"cpu": 2.0, "gpu": 1.0})
        assert config.users["nobody"].default_priority is Priority.NORMAL

    @pytest.mark.parametrize("data, message", [
        ({"max_runing_jobs": 3}, "unknown key(s) max_runing_jobs"),
        ({"pool": {"cpus": 3}}, "[pool]: unknown key(s) cpus"),
        ({"users": {"default": {"priority_ceiling": "urgent"}}}, "unknown priority 'urgent'"),
        ({"users": {"x": {"default_priority": "high", "priority_ceiling": "low"}}}, "above priority_ceiling"),
        ({"users": {"x": {"cpu": -1}}}, "cpu must be a number >= 0"),
        ({"max_running_jobs": 0}, "must be an int >= 1"),
        ({"admin_group": "no-such-group-here"}, "is not a group on this machine"),
        ({"pool": {"preemption": "yes"}}, "must be true or false"),
    ])
    def test_mistakes_are_named(self, data: dict, message: str) -> None:
        with pytest.raises(DaemonConfigError) as info:
            parse_config(data, "agentd.toml")
        assert message in str(info.value)

    def test_bad_toml_and_missing_explicit_file(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.toml"
        bad.write_text("max_running_jobs = = 3\n")
        with pytest.raises(DaemonConfigError, match="not valid TOML"):
            load_config(str(bad))
        with pytest.raises(DaemonConfigError, match="does not exist"):
            load_config(str(tmp_path / "absent.toml"))

    @pytest.mark.skipif(os.geteuid() != 0, reason="agentd needs root")
    def test_agentd_refuses_to_start_on_a_bad_config(self, tmp_path: Path) -> None:
        config = tmp_path / "agentd.toml"
        config.write_text("[users.default]\npriority_ceiling = 'urgent'\n")
        done = subprocess.run([AGENTD, "--socket", str(tmp_path / "s"), "--state-dir", str(tmp_path / "state"),
                               "--config", str(config)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("agentd: ")
        assert "unknown priority 'urgent'" in done.stderr


TWO_STATES = '''
import asyncio, os
from agent import Agent, ResourceRequirements

agent = Agent("quota")

async def start(context):
    return ["left", "right"]

async def work(context):
    while not os.path.exists(context.get_state("release")):
        await asyncio.sleep(0.05)
    return None

agent.add_state("start", start)
agent.add_state("left", work, resources=ResourceRequirements(cpu_units=1, memory_mb=32))
agent.add_state("right", work, resources=ResourceRequirements(cpu_units=1, memory_mb=32))
'''

TOO_BIG = '''
from agent import Agent, ResourceRequirements

agent = Agent("too_big")

async def big(context):
    return None

agent.add_state("big", big, resources=ResourceRequirements(cpu_units=2, memory_mb=32))
'''


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_users_quota_caps_their_states_and_their_job_cgroups(agentd: Agentd, users: tuple[User, User],
                                                                workdir: Path, outdir: Path) -> None:
    ann, _ = users
    agentd.configure(f"[pool]\ncpu = 4\n\n[users.{ann.name}]\ncpu = 1\nmemory_mb = 512\n")
    agentd.start()
    job = agentd.submit(write_workflow(workdir, "quota.py", TWO_STATES), "--param", f"release={outdir / 'go'}",
                        user=ann)

    def one_runs_one_waits() -> dict | None:
        status = agentd.status(job, user=ann)
        running = [s for s in ("left", "right") if status["states"].get(s) == "running"]
        return status if len(running) == 1 and status["waiting"] else None

    status = wait_until(one_runs_one_waits, "one state to run and the other to wait for ann's quota")
    [reason] = status["waiting"].values()
    assert f"quota of state 'user {ann.name}'" in reason and "1 of 1 in use" in reason

    # The job's cgroup carries the quota as kernel ceilings; its limit files stay root's.
    [memory] = [d for d in agentd.incarnation_dirs() if "/memory/" in d]
    [cpu] = [d for d in agentd.incarnation_dirs() if "/cpu/" in d]
    job_memory, job_cpu = Path(f"{memory}/job-{job}"), Path(f"{cpu}/job-{job}")
    assert int((job_memory / "memory.limit_in_bytes").read_text()) == 512 * 1024 * 1024
    assert int((job_cpu / "cpu.cfs_quota_us").read_text()) == int((job_cpu / "cpu.cfs_period_us").read_text())
    assert job_memory.stat().st_uid == ann.uid and (job_memory / "cgroup.procs").stat().st_uid == ann.uid
    assert (job_memory / "memory.limit_in_bytes").stat().st_uid == 0
    (outdir / "go").touch()
    assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"

    too_big = agentd.submit(write_workflow(workdir, "too_big.py", TOO_BIG), user=ann)
    final = agentd.wait_status(too_big, "completed", "failed")
    assert final["status"] == "failed" and "quota" in final["error"] and "cpu=1" in final["error"]


SANDBOXED = '''
from agent import Agent

agent = Agent("boxed")

async def first(context):
    with open({out!r}, "a") as f:
        f.write("first ran\\n")
    return "boxed"

async def boxed(context):
    return None

agent.add_state("first", first)
agent.add_state("boxed", boxed, isolation="sandbox")
'''


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_users_job_with_a_sandboxed_state_is_refused_as_it_loads(agentd: Agentd, users: tuple[User, User],
                                                                    workdir: Path, outdir: Path) -> None:
    """Leasing a uid needs root: the job failed only when it reached the sandboxed state,
    after the states before it (and their human answers) had run for nothing."""
    ann, _ = users
    agentd.start()
    out = shared_file(outdir, "ran.txt")
    job = agentd.submit(write_workflow(workdir, "boxed.py", SANDBOXED.format(out=str(out))), user=ann)
    final = agentd.wait_status(job, "completed", "failed")
    assert final["status"] == "failed"
    assert "state 'boxed' uses isolation='sandbox', which agentd runs only in root's jobs" in final["error"]
    assert out.read_text() == ""
