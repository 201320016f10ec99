"""Without Ray installed, asking for it is a clear error; declaring Ray options needs no Ray."""

from __future__ import annotations

import sys

import pytest

from agent import Agent, Isolation, IsolationUnavailableError
from agent.errors import InvalidConfigurationError, RayUnavailableError
from agent.executor import executor_for
from agent.ray import RayOptions, ray_options
from agent.ray.options import options_of


async def work(context):
    return None


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if Ray were not installed (``import ray`` fails)."""
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "agent.ray.executor", raising=False)


class TestWithoutRay:
    """Every way of asking for isolation='ray' says to install the [ray] extra."""

    def test_agent_level(self, no_ray):
        with pytest.raises(RayUnavailableError, match=r"pip install 'agent-isolation\[ray\]'"):
            Agent("needs_ray", isolation="ray")

    def test_state_level(self, no_ray):
        agent = Agent("mixed", isolation="inline")
        with pytest.raises(RayUnavailableError, match="not installed"):
            agent.add_state("work", work, isolation=Isolation.RAY)

    def test_environment_default(self, no_ray, monkeypatch):
        monkeypatch.setenv("AGENT_ISOLATION", "ray")
        with pytest.raises(RayUnavailableError):
            Agent("from_env")

    def test_the_executor_seam(self, no_ray):
        with pytest.raises(RayUnavailableError) as caught:
            executor_for(Isolation.RAY)
        assert isinstance(caught.value, IsolationUnavailableError)

    def test_other_levels_do_not_care(self, no_ray):
        Agent("inline", isolation="inline").add_state("work", work, isolation="process")


class TestRayOptions:
    """ray_options records Ray-only settings and refuses what belongs to ResourceRequirements."""

    def test_recorded_on_the_function(self):
        async def train(context):
            return None

        decorated = ray_options(resources={"ssd": 1}, accelerator_type="A100",
                                runtime_env={"env_vars": {"X": "1"}})(train)
        assert decorated is train
        assert options_of(train) == RayOptions({"ssd": 1.0}, "A100", {"env_vars": {"X": "1"}})
        assert options_of(train).task_options() == {
            "resources": {"ssd": 1.0}, "accelerator_type": "A100", "runtime_env": {"env_vars": {"X": "1"}},
        }
        assert options_of(work) is None

    @pytest.mark.parametrize("name", ["CPU", "GPU", "memory", "object_store_memory"])
    def test_reserved_names_point_to_resource_requirements(self, name):
        with pytest.raises(InvalidConfigurationError, match="ResourceRequirements"):
            ray_options(resources={name: 1})

    @pytest.mark.parametrize("amount", [-1, float("nan"), float("inf"), "1", True])
    def test_bad_amounts(self, amount):
        with pytest.raises(InvalidConfigurationError, match="needs an amount >= 0"):
            ray_options(resources={"ssd": amount})

    def test_bad_runtime_env(self):
        with pytest.raises(InvalidConfigurationError, match="runtime_env is a dict"):
            ray_options(runtime_env=["pip"])  # type: ignore[arg-type]


TWO_RUNS = """
from agent import Agent, StateFailedError

async def one(context):
    return None

def helper():
    raise ValueError("from the script")

async def fails(context):
    helper()

for i in range(2):
    agent = Agent(f"twice_{i}", isolation="ray")
    agent.add_state("one", one)
    agent.run_sync(timeout=60)  # its loop, and the threads it started, end here
    print("ran", i, flush=True)
agent = Agent("fails", isolation="ray")
agent.add_state("fails", fails)
try:
    agent.run_sync(timeout=60)
except StateFailedError as exc:
    print(exc.reason.traceback)
"""


@pytest.mark.timeout(240)
def test_a_cluster_the_package_started_outlives_the_run_that_started_it_and_goes_with_the_program(tmp_path) -> None:
    # Ray ties a local cluster's processes to the thread that starts it: started on a
    # thread of the first run's loop, it died with that run, and the next run hung.
    # (And a failing state's traceback names the script's lines, as in a state process.)
    pytest.importorskip("ray")
    import os
    import subprocess
    import time
    from pathlib import Path

    script = tmp_path / "flow.py"
    script.write_text(TWO_RUNS)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=200,
                          cwd=tmp_path, env=env)
    assert done.stdout.splitlines()[:2] == ["ran 0", "ran 1"], done.stderr[-3000:]
    assert f'File "{script}", line 8, in helper' in done.stdout, done.stdout
    assert "<dynamic-code>" not in done.stdout
    assert done.returncode == 0

    def left() -> list[int]:  # what the program started works in its folder
        found = []
        for entry in os.listdir("/proc"):
            try:
                if os.readlink(f"/proc/{entry}/cwd") == str(tmp_path):
                    found.append(int(entry))
            except (OSError, ValueError):
                continue
        return found

    deadline = time.monotonic() + 30  # Ray's processes left without their cluster lived a minute
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == []  # the local cluster it started went with the program


NOBODY_THERE = """
import agent.ray.cluster as cluster
from agent import Agent
from agent.errors import StateFailedError
cluster.CONNECT_SECONDS = 2.0

async def noop(context):
    return None

agent = Agent("nobody_there", isolation="ray")
agent.add_state("noop", noop)
try:
    agent.run_sync()
except StateFailedError as exc:
    print(exc.reason.exception_type, exc.reason.message)
"""


@pytest.mark.timeout(120)
def test_an_address_nothing_serves_fails_the_state_saying_so(tmp_path) -> None:
    # ray.init() waits for ever on such an address: the run hung, and the program with it.
    pytest.importorskip("ray")
    import os
    import subprocess
    from pathlib import Path

    script = tmp_path / "flow.py"
    script.write_text(NOBODY_THERE)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), RAY_ADDRESS="127.0.0.1:1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "agent.errors.RayUnavailableError" in done.stdout
    assert "no Ray cluster answered at 127.0.0.1:1 within 2 s" in done.stdout
