"""The public surface is pinned: names the API guide uses exist and are exported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import agent

SPEC_NAMES = {
    "Agent", "Context", "StateResult", "TypedContextData", "ResourceRequirements", "ResourcePool",
    "ResourceType", "Priority", "DependencyType", "DependencyLifecycle", "DependencyConfig",
    "RetryPolicy", "AgentStatus", "StateStatus",
}


class TestSurface:
    """Every spec name is exported and listed in __all__."""

    def test_spec_names(self):
        missing = sorted(n for n in SPEC_NAMES if n not in agent.__all__ or not hasattr(agent, n))
        assert missing == []

    def test_all_is_importable(self):
        for name in agent.__all__:
            assert hasattr(agent, name), name

    def test_status_values(self):
        assert {s.name for s in agent.AgentStatus} >= {"IDLE", "RUNNING", "PAUSED", "COMPLETED", "FAILED"}
        assert {s.name for s in agent.StateStatus} == {
            "PENDING", "READY", "RUNNING", "COMPLETED", "FAILED", "BLOCKED", "CANCELLED", "TIMEOUT"}

    def test_errors_share_one_root(self):
        errors = [getattr(agent, n) for n in agent.__all__ if n.endswith("Error")]
        assert errors and all(issubclass(e, agent.AgentError) for e in errors)


class TestCli:
    """`agent --version` and `agent run FILE` work as a user would call them."""

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[2])

    def test_version(self):
        out = self.run_cli("--version")
        assert out.returncode == 0
        assert out.stdout.strip() == f"agent {agent.__version__}"

    def test_run_example(self):
        out = self.run_cli("run", "examples/quickstart.py", "--json")
        assert out.returncode == 0, out.stderr
        assert "Result: Hello, World!" in out.stderr  # state output goes to stderr under --json
        assert json.loads(out.stdout)["status"] == "completed"

    def test_run_failing_workflow(self, tmp_path):
        flow = tmp_path / "broken.py"
        flow.write_text(
            "from agent import Agent\n"
            "agent = Agent('broken', isolation='inline')\n"
            "async def s(context):\n"
            "    raise ValueError('no good')\n"
            "agent.add_state('s', s)\n"
        )
        out = self.run_cli("run", str(flow), "--json")
        assert out.returncode == 1
        assert "ValueError: no good" in out.stderr
        assert json.loads(out.stdout)["status"] == "failed"

    def test_run_file_without_agent(self, tmp_path):
        flow = tmp_path / "empty.py"
        flow.write_text("x = 1\n")
        out = self.run_cli("run", str(flow))
        assert out.returncode == 3
        assert "defines no Agent" in out.stderr
