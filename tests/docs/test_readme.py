"""The README's code, run as written: every Python block, and the output it says it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

FENCED = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)
# Each ```python block, and the ```console block that follows it (if the next block is one).
BLOCKS = [(body, FENCED[i + 1][1] if i + 1 < len(FENCED) and FENCED[i + 1][0] == "console" else "")
          for i, (lang, body) in enumerate(FENCED) if lang == "python"]
MEASURED = re.compile(r"\b[0-9a-f]{32}\b|\d[\d,]*(?:\.\d+)? ?(?:ms|s|MiB|CPU-seconds)\b")


def normalized(text: str) -> set[str]:
    """Lines with run ids and measured figures (times, memory) masked."""
    return {MEASURED.sub("<measured>", line.rstrip()) for line in text.splitlines() if line.strip()}


def expected_output(console: str, command: str) -> set[str]:
    """The lines the README shows after ``$ COMMAND``, up to the next prompt."""
    lines, taking = [], False
    for line in console.splitlines():
        if line.startswith("$ "):
            taking = line[2:].split()[:2] == command.split()[:2]
            continue
        if taking and line.strip():
            lines.append(line)
    return normalized("\n".join(lines))


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AGENT_STATE_DIR=str(cwd / "state"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("AGENT_ECHO", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def test_there_is_code_to_run():
    assert len(BLOCKS) >= 2 and "hello_workflow" in BLOCKS[0][0]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs_with_python(tmp_path, index):
    source, console = BLOCKS[index]
    name = re.search(r"\$ python (\S+)", console or "")
    file = tmp_path / (name.group(1) if name else f"block_{index}.py")
    file.write_text(source)
    done = run([sys.executable, file.name], tmp_path)
    assert done.returncode == 0, done.stderr
    if console:
        missing = expected_output(console, f"python {file.name}") - normalized(done.stdout + done.stderr)
        assert not missing, f"the README shows lines this run did not print: {missing}\n{done.stdout}"


@pytest.mark.parametrize("index", [i for i, (source, _) in enumerate(BLOCKS) if "__main__" in source])
def test_block_runs_with_agent_run(tmp_path, index):
    source, console = BLOCKS[index]
    name = re.search(r"\$ agent run (\S+)", console or "")
    file = tmp_path / (name.group(1) if name else f"block_{index}.py")
    file.write_text(source)
    done = run([sys.executable, "-m", "agent", "run", file.name], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(" started ") == 1  # run once, by the command
    if name:
        missing = expected_output(console, f"agent run {file.name}") - normalized(done.stdout + done.stderr)
        assert not missing, f"the README shows lines this run did not print: {missing}\n{done.stderr}"


def test_quick_start_prints_its_result_both_ways(tmp_path):
    (tmp_path / "hello.py").write_text(BLOCKS[0][0])
    for args in ([sys.executable, "hello.py"], [sys.executable, "-m", "agent", "run", "hello.py"]):
        done = run(args, tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["format_output | Result: Hello, World!"]


def test_links_to_docs_exist():
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).is_file(), target
