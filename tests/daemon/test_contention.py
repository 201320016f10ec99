"""Two users' jobs contend for the box's CPUs and GPUs: priority decides, with preemption across jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import Agentd, User, shared_file, wait_until, write_workflow

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CONFIG = """
[pool]
cpu = 2
memory_mb = 4096
"""

GPUS = json.dumps([{"index": 0, "uuid": "GPU-agentd-test-0", "name": "Test GPU", "memory_mb": 1024, "minor": 0}])

# One state that holds the whole box (2 CPUs, or the one GPU) until its file appears.
HOLDER = '''
import asyncio, os, time
from agent import Agent, ResourceRequirements

agent = Agent("{name}")

async def hold(context):
    out = context.get_state("out")
    with open(out, "a") as f:
        f.write(f"{name} start cuda={{os.environ.get('CUDA_VISIBLE_DEVICES')}}\\n")
    while not os.path.exists(context.get_state("release")):
        await asyncio.sleep(0.05)
    with open(out, "a") as f:
        f.write("{name} end\\n")
    return None

agent.add_state("hold", hold, resources=ResourceRequirements({resources}))
'''


def _flows(workdir: Path, resources: str) -> tuple[Path, Path]:
    return (write_workflow(workdir, "batch.py", HOLDER.format(name="batch", resources=resources)),
            write_workflow(workdir, "urgent.py", HOLDER.format(name="urgent", resources=resources)))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class TestPriorityAcrossUsers:
    """A HIGH job of one user preempts a LOW job of another that holds what it needs."""

    def test_cpu_contention_preempts_the_lower_priority_job(self, agentd: Agentd, users: tuple[User, User],
                                                             workdir: Path, outdir: Path) -> None:
        agentd.configure(CONFIG)
        self._contend(agentd, users, workdir, outdir, "cpu_units=2, memory_mb=64")

    def test_gpu_contention_preempts_and_moves_the_device(self, agentd: Agentd, users: tuple[User, User],
                                                          workdir: Path, outdir: Path) -> None:
        agentd.env["AGENT_GPUS"] = GPUS
        out = self._contend(agentd, users, workdir, outdir, "cpu_units=0.1, memory_mb=64, gpu_units=1",
                            check_devices=True)
        assert "batch start cuda=GPU-agentd-test-0" in out and "urgent start cuda=GPU-agentd-test-0" in out

    @staticmethod
    def _contend(agentd: Agentd, users: tuple[User, User], workdir: Path, out: Path, resources: str,
                 check_devices: bool = False) -> str:
        ann, bob = users
        log = shared_file(out, "events.txt")  # both users' states append to it
        batch_flow, urgent_flow = _flows(workdir, resources)
        agentd.start()
        batch = agentd.submit(batch_flow, "--priority", "low", "--param", f"out={log}",
                              "--param", f"release={out / 'batch-go'}", user=ann)
        wait_until(lambda: _lines(log) and _lines(log)[-1].startswith("batch start"), "the batch job to hold the box")
        if check_devices:
            assert "c 195:0 rwm" in _devices(agentd, batch)
        urgent = agentd.submit(urgent_flow, "--priority", "high", "--param", f"out={log}",
                               "--param", f"release={out / 'urgent-go'}", user=bob)
        wait_until(lambda: any(line.startswith("urgent start") for line in _lines(log)), "the urgent job to start")
        status = agentd.status(batch)
        assert status["status"] == "running" and status["states"]["hold"] != "completed"
        if check_devices:  # the GPU moved: bob's job may open it, ann's may not any more
            assert "c 195:0 rwm" in _devices(agentd, urgent)
            assert "c 195:0 rwm" not in _devices(agentd, batch)
        waiting = wait_until(lambda: agentd.status(batch)["waiting"], "the batch job to wait for the box")
        assert "hold" in waiting, waiting
        (out / "urgent-go").touch()
        assert agentd.wait_status(urgent, "completed", "failed")["status"] == "completed"
        wait_until(lambda: _lines(log).count(_lines(log)[0]) == 2, "the preempted batch state to start again")
        (out / "batch-go").touch()
        assert agentd.wait_status(batch, "completed", "failed")["status"] == "completed"
        events = [line.split(" cuda=")[0] for line in _lines(log)]
        assert events == ["batch start", "urgent start", "urgent end", "batch start", "batch end"], events
        return log.read_text()


def _devices(agentd: Agentd, job: str) -> str:
    [path] = [d for d in agentd.incarnation_dirs() if "/devices/" in d]
    with open(f"{path}/job-{job}/devices.list") as f:
        return f.read()
