"""``agentctl install``: put agentd's systemd unit, groups and configuration in place, and start it.

The unit in ``systemd/agentd.service`` names ``/opt/agent-venv/bin/agentd``; the installed
copy names the ``agentd`` next to the running ``agentctl`` (the venv it belongs to).
Files: ``/etc/systemd/system/agentd.service``, ``/etc/sysusers.d/agent.conf`` (the
``agent`` and ``agent-admin`` groups), ``/etc/agent/agentd.toml`` (only when there is
none). Then ``systemd-sysusers``, ``systemctl daemon-reload`` and ``systemctl enable
--now agentd``. ``--root DIR`` writes below DIR and runs nothing (for packaging and tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import DaemonError

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_AGENTD = "/opt/agent-venv/bin/agentd"


def templates() -> Path:
    """Where the unit files are: the checkout's ``systemd/``, or the wheel's ``share/agent/systemd``."""
    for candidate in (_PACKAGE_ROOT / "systemd", Path(sys.prefix) / "share" / "agent" / "systemd"):
        if (candidate / "agentd.service").is_file():
            return candidate
    raise DaemonError("cannot find agentd.service (looked in the checkout's systemd/ and share/agent/systemd)")


def render_unit(text: str, agentd: str) -> str:
    """The unit with ExecStart naming ``agentd``."""
    return text.replace(SHIPPED_AGENTD, agentd)


def install(root: str = "/", start: bool = True) -> list[str]:
    """Install (see the module docstring); returns what was done, one line each."""
    if root == "/" and os.geteuid() != 0:
        raise DaemonError("installing the service needs root: run it with sudo")
    source = templates()
    agentd = str(Path(sys.executable).parent / "agentd")  # the venv agentctl runs from
    base = Path(root)
    done = []
    targets = (
        ("etc/systemd/system/agentd.service", render_unit((source / "agentd.service").read_text(), agentd), True),
        ("etc/sysusers.d/agent.conf", (source / "agentd.sysusers").read_text(), True),
        ("etc/agent/agentd.toml", (source / "agentd.toml").read_text(), False),
    )
    for relative, text, replace in targets:
        path = base / relative
        if path.exists() and not replace:
            done.append(f"kept {path}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
        done.append(f"wrote {path}")
    if root == "/" and start:
        for argv in (["systemd-sysusers", "/etc/sysusers.d/agent.conf"], ["systemctl", "daemon-reload"],
                     ["systemctl", "enable", "--now", "agentd.service"]):
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                raise DaemonError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.returncode}")
            done.append("ran " + " ".join(argv))
    return done
