"""A checkpointed run on Ray survives its driver: kill -9 the driver, resume the run elsewhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from agent import AgentStatus
from agent.checkpoint_store import SQLiteCheckpointStore

from . import crash_driver
from .helpers import worker_gone

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def wait_for_effect(directory: Path, name: str, proc: subprocess.Popen[bytes], limit: float = 120.0) -> None:
    """Poll the effects file another process writes until ``name`` is in it (bounded)."""
    deadline = time.monotonic() + limit
    while crash_driver.counts(directory)[name] < 1:
        assert proc.poll() is None, f"the driver exited before {name} ran"
        assert time.monotonic() < deadline, f"gave up waiting for {name}"
        time.sleep(0.01)


class TestDriverCrash:
    """The driver dies (SIGKILL) while a Ray state runs; a new driver resumes from the checkpoint."""

    async def test_resume_on_ray_after_sigkill(self, ray_cluster, tmp_path):
        hung = "step_4"
        (tmp_path / f"hang_{hung}").touch()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ray.crash_driver", ray_cluster.get_runtime_context().gcs_address,
             str(tmp_path), "run"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_effect(tmp_path, hung, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        (name, run_id, pid), = [e for e in crash_driver.effects(tmp_path) if e[0] == hung]
        # Ray stops the dead driver's task: its worker does not linger.
        assert worker_gone(pid)
        with SQLiteCheckpointStore(tmp_path / "runs.sqlite3") as store:
            assert store.latest(run_id).completed_states == {"step_1", "step_2", "step_3"}

        os.unlink(tmp_path / f"hang_{hung}")
        agent = crash_driver.build_agent(tmp_path)
        try:
            ctx = await agent.resume_run(run_id)
        finally:
            agent.checkpoint_store.close()
        assert agent.status is AgentStatus.COMPLETED
        assert all(ctx.get_state(f"{s}_done") for s in crash_driver.STATES)
        # Completed states ran once; the one that was running ran again; the rest once.
        assert crash_driver.counts(tmp_path) == {s: 2 if s == hung else 1 for s in crash_driver.STATES}
        assert {r for _, r, _ in crash_driver.effects(tmp_path)} == {run_id}
