"""A state may fork: process pools on the script's own functions, and forks that keep its files.

Each case runs a script as a user would (``python flow.py``), so that the state and the
functions it hands to its pool come from the program's ``__main__``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])

FLOW = textwrap.dedent(
    """
    import asyncio, json, sys
    from agent import Agent

    def square(x):
        return x * x

    class Box:
        def __init__(self, value):
            self.value = value

    def unbox(box):
        return box.value

    async def pooled(context):
        import concurrent.futures, multiprocessing
        with multiprocessing.Pool(2) as pool:
            mapped = pool.map(square, range(4))
        with concurrent.futures.ProcessPoolExecutor(2) as executor:
            unboxed = list(executor.map(unbox, [Box(1), Box(2)]))
        spawned = None
        if context.get_state("spawn"):  # a spawned process imports this script as __mp_main__
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                spawned = pool.map(square, [3])
        context.set_state("out", [mapped, unboxed, spawned])

    async def forks(context):
        import os
        pipes = [os.pipe() for _ in range(8)]  # the lowest free descriptors
        inodes = {fd: os.fstat(fd).st_ino for pair in pipes for fd in pair}
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            kept = all(os.fstat(fd).st_ino == inode for fd, inode in inodes.items())
            os.write(writer, b"kept" if kept else b"lost")
            os._exit(0)
        os.close(writer)
        said = os.read(reader, 8).decode()
        os.waitpid(pid, 0)
        context.set_state("out", said)

    if __name__ == "__main__":
        level, state = sys.argv[1], sys.argv[2]
        agent = Agent("forking", isolation=level)
        agent.add_state("s", pooled if state == "pooled" else forks, timeout=60, context_keys=["spawn", "out"])
        context = asyncio.run(agent.run(initial_context={"spawn": level != "sandbox"}))
        print(json.dumps(context.get_state("out")))
    """
)


def run_flow(tmp_path: Path, level: str, state: str) -> object:
    script = tmp_path / "flow.py"
    script.write_text(FLOW)
    done = subprocess.run([sys.executable, str(script), level, state], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT, AGENT_ECHO="off"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("level", ["inline", "process", "worker", "sandbox"])
def test_a_state_hands_the_scripts_functions_and_classes_to_process_pools(tmp_path, level):
    mapped, unboxed, spawned = run_flow(tmp_path, level, "pooled")  # type: ignore[misc]
    assert mapped == [0, 1, 4, 9]
    assert unboxed == [1, 2]
    # A sandbox sees no /tmp of ours, where this script is: its pools fork, not spawn.
    assert spawned == (None if level == "sandbox" else [9])


@pytest.mark.parametrize("level", ["process", "sandbox"])
def test_a_process_forked_by_a_state_keeps_the_states_files(tmp_path, level):
    assert run_flow(tmp_path, level, "forks") == "kept"


FAILING = textwrap.dedent(
    """
    import asyncio, sys
    from agent import Agent

    def helper(x):
        raise ValueError(f"bad {x}")

    async def step(context):
        return helper(3)

    agent = Agent("failing", isolation=sys.argv[1])
    agent.add_state("step", step)
    try:
        asyncio.run(agent.run())
    except Exception as exc:
        print(exc)
    """
)


@pytest.mark.parametrize("level", ["inline", "process", "worker", "sandbox"])
def test_a_failing_states_traceback_points_at_the_script(tmp_path, level):
    # cloudpickle names the code it copies "<dynamic-code>": the state's process gives the
    # script's functions their file back, so the traceback reads as it does inline.
    script = tmp_path / "flow.py"
    script.write_text(FAILING)
    done = subprocess.run([sys.executable, str(script), level], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=ROOT, AGENT_ECHO="off"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'File "{script}", line 9, in step' in done.stdout, done.stdout
    assert f'File "{script}", line 6, in helper' in done.stdout
    if level != "sandbox":  # a sandbox cannot read our /tmp, where the script is: no source lines
        assert 'raise ValueError(f"bad {x}")' in done.stdout
    assert "<dynamic-code>" not in done.stdout
