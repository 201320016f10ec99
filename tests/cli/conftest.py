"""Running the ``agent`` command as a user would: a subprocess, its own state directory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Cli:
    """``agent ...`` in a subprocess, with this test's state directory and log directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.state_dir = tmp_path / "state"
        self.log_dir = tmp_path / "logs"
        self.env = dict(os.environ, AGENT_STATE_DIR=str(self.state_dir), AGENT_LOG_DIR=str(self.log_dir),
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.env.pop("AGENT_ECHO", None)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "agent", *args]

    def run(self, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir, env=self.env, **kwargs)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, cwd=self.dir, env=self.env)

    def python(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL)

    def write(self, name: str, source: str) -> Path:
        path = self.dir / name
        path.write_text(textwrap.dedent(source))
        return path

    def fifo(self, name: str) -> Path:
        """A named pipe a workflow's state blocks on until the test writes to it (a handshake)."""
        path = self.dir / name
        os.mkfifo(path)
        return path


def release(fifo: Path) -> None:
    """Let the state blocked reading ``fifo`` go on."""
    with open(fifo, "w") as fh:
        fh.write("go\n")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)
