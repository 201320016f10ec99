"""The systemd unit: `systemd-analyze verify` clean, and `agentctl install` renders it for this venv."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon.config import load_config
from agent.daemon.install import SHIPPED_AGENTD, install, render_unit

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
AGENTD = str(Path(sys.executable).parent / "agentd")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(path.read_text())
    return parser


@needs_analyze
@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.glob("*.service")))
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    """Every shipped unit verifies clean (ExecStart pointed at this venv's agentd, as install does)."""
    target = tmp_path / unit
    target.write_text(render_unit((UNITS / unit).read_text(), AGENTD))
    done = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_the_unit_is_a_delegated_notify_service() -> None:
    service = _unit(UNITS / "agentd.service")["Service"]
    assert service["Type"] == "notify" and service["Delegate"] == "yes" and service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure" and service["WatchdogSec"]
    assert {"RuntimeDirectory", "StateDirectory", "LogsDirectory"} <= set(service)
    for breaks_delegation in ("ProtectControlGroups", "ProtectKernelTunables", "PrivateDevices", "DevicePolicy"):
        assert breaks_delegation not in service
    assert service["ExecStart"].startswith(SHIPPED_AGENTD + " --socket /run/agent/agentd.sock --state-dir")


def test_shipped_config_parses_when_its_groups_exist(tmp_path: Path) -> None:
    text = (UNITS / "agentd.toml").read_text()
    config = tmp_path / "agentd.toml"
    config.write_text(text.replace('"agent-admin"', '"root"').replace('"agent"', '"root"'))
    parsed = load_config(str(config))
    assert parsed.client_group == "root" and parsed.preemption and parsed.max_running_jobs == 64


@needs_analyze
def test_install_into_a_root_directory(tmp_path: Path) -> None:
    """`agentctl install --root DIR` writes the unit (verified), the groups and a config it never overwrites."""
    done = subprocess.run([str(Path(sys.executable).parent / "agentctl"), "install", "--root", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "etc/systemd/system/agentd.service"
    assert f"ExecStart={AGENTD} " in unit.read_text()
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    assert "g agent -" in (tmp_path / "etc/sysusers.d/agent.conf").read_text()
    config = tmp_path / "etc/agent/agentd.toml"
    config.write_text("# edited by the operator\n")
    assert f"kept {config}" in install(str(tmp_path), start=False)
    assert config.read_text() == "# edited by the operator\n"
