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

    def start_talker(self) -> subprocess.Popen[str]:
        """``agent run`` of :data:`TALKER`, once its state printed its first line (it then waits on ``go``)."""
        self.write("talker.py", TALKER)
        self.env["GO"] = str(self.fifo("go"))
        proc = self.start("run", "talker.py")
        assert proc.stdout.readline() == "talk | first\n"
        return proc

    def fifo(self, name: str) -> Path:
        """A named pipe a workflow's state blocks on until the test writes to it (a handshake)."""
        path = self.dir / name
        os.mkfifo(path)
        return path


TALKER = """\
import os
from agent import Agent

agent = Agent("talker")

async def talk(context):
    print("first", flush=True)
    with open(os.environ["GO"]) as fifo:  # blocks until the test releases it
        fifo.read()
    print("second")
    print("no newline at the end", end="")
    return None

agent.add_state("talk", talk)
"""
"""A state that prints, waits on the fifo $GO, then prints again (the last line without a newline)."""


CHAIN = """\
import os
from agent import Agent
from agent.checkpoint_store import SQLiteCheckpointStore

store = SQLiteCheckpointStore(os.environ["STORE"]) if os.environ.get("STORE") else None
agent = Agent("nightly_etl", isolation=os.environ.get("ISOLATION", "process"), checkpoint_store=store)

def effect(name):
    with open(os.environ["EFFECTS"], "a") as fh:
        fh.write(name + "\\n")

async def extract(context):
    effect("extract")
    return "transform"

async def transform(context):
    effect("transform")
    if os.environ.get("HANG"):
        print("transform is waiting", flush=True)
        with open(os.environ["GO"]) as fifo:  # until the test releases it (or kills the run)
            fifo.read()
    return "load"

async def load(context):
    effect("load")
    return None

agent.add_state("extract", extract)
agent.add_state("transform", transform)
agent.add_state("load", load)

if __name__ == "__main__":
    agent.run_sync()
"""
"""extract -> transform -> load, each noting its side effect in $EFFECTS; with $HANG, transform
waits on the fifo $GO after its effect. Saved to $STORE when set."""


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
