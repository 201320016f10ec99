"""Children parked for sandboxed launches: each PID 1 of a namespace of its own, taken only
by a sandboxed launch, and as closed in as a child forked for its launch."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from agent import Agent
from agent.executor import read_attempt_log
from agent.runtime import seccomp
from agent.supervisor import current_supervisor, shutdown_supervisor

from . import escapes

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root"),
    pytest.mark.skipif(not seccomp.supported(), reason="no seccomp table for this architecture"),
]


def own_pid_namespace(pid: int) -> bool:
    """Whether ``pid`` is PID 1 of a PID namespace below ours."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("NSpid:"):
                return line.split()[1:] == [str(pid), "1"]
    return False


def named(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as fh:
        return fh.read().strip()


async def parked_for_sandboxes(deadline: float) -> set[int]:
    """The supervisor's parked children that were parked for sandboxed launches."""
    while time.monotonic() < deadline:
        sup = current_supervisor()
        found = set()
        for pid in set(sup.parked) if sup is not None else ():
            try:
                if own_pid_namespace(pid) and named(pid) == "agent-parked":
                    found.add(pid)
            except OSError:
                pass
        if found:
            return found
        await asyncio.sleep(0.01)  # the zygote's reports come in on this loop
    raise AssertionError("no child was parked for sandboxed launches")


class Spawned(list[int]):
    parked: dict[int, bool]

    def __init__(self) -> None:
        super().__init__()
        self.parked = {}


@pytest.fixture
def spawned() -> Any:
    """The pids serving launches from now on, forked or parked (and, in ``pids.parked``, each
    child the zygote parks: pid -> parked for sandboxed launches)."""
    shutdown_supervisor()
    pids = Spawned()

    def watch() -> None:
        sup = current_supervisor()
        assert sup is not None
        report = sup.zygote._on_report

        def recording(message: dict[str, Any]) -> None:
            if message.get("op") == "spawned":
                pids.append(message["pid"])
            elif message.get("op") == "parked":
                pids.parked[message["pid"]] = bool(message.get("sandbox"))
            report(message)

        sup.zygote._on_report = recording
        hand_over = sup.zygote.hand_over

        def handing(spec: Any, sock: Any, pid: int, **options: Any) -> Any:
            charged = hand_over(spec, sock, pid, **options)
            if charged is not None:
                pids.append(pid)
            return charged

        sup.zygote.hand_over = handing  # type: ignore[method-assign]

    yield watch, pids
    shutdown_supervisor()


async def test_a_sandboxed_launch_takes_a_child_parked_for_one(spawned: Any) -> None:
    watch, pids = spawned
    agent = Agent("parked_sandbox", isolation="sandbox")
    agent.add_state("look", escapes.look_at_processes, context_keys=["out", "supervisor", "zygote"])
    await agent.run(initial_context={"supervisor": os.getpid(), "zygote": 1})
    watch()
    waiting = await parked_for_sandboxes(time.monotonic() + 60)
    zygote = current_supervisor().zygote.pid  # type: ignore[union-attr]
    for _ in range(3):
        out = (await agent.run(initial_context={"supervisor": os.getpid(), "zygote": zygote})).get_state("out")
        # Each as closed in as a child forked for its launch: alone as PID 1, nothing to signal.
        assert out["pid"] == 1 and out["proc"] == [1]
        assert out["kill supervisor"] == "ESRCH" and out["kill zygote"] == "ESRCH"
    assert waiting & set(pids)


@pytest.mark.timeout(240)  # four runs, each a launch of seconds on an emulated machine
async def test_other_launches_never_take_a_child_parked_for_a_sandbox(spawned: Any) -> None:
    watch, pids = spawned
    sandboxed = Agent("warm_sandbox", isolation="sandbox")
    sandboxed.add_state("look", escapes.look_at_processes, context_keys=["out", "supervisor", "zygote"])
    await sandboxed.run(initial_context={"supervisor": 1, "zygote": 1})
    watch()
    waiting = await parked_for_sandboxes(time.monotonic() + 60)
    plain = Agent("plain", isolation="process")
    plain.add_state("pid", escapes.note_pid)
    for _ in range(3):
        await plain.run()
    assert pids and not waiting & set(pids)
    plain = [pid for pid, sandboxed in pids.parked.items() if not sandboxed]
    assert plain  # children were parked for plain launches, apart; those still there share our PID namespace
    assert all(not own_pid_namespace(pid) for pid in set(plain) & current_supervisor().parked)  # type: ignore[union-attr]


VIEW_STATE = """
import os

LOADED_WITH = dict(os.environ)  # what the module saw as it loaded, in the sandbox's process

async def look(context):
    print("from a module under /tmp")
    with open("/proc/self/mountinfo") as fh:
        mounts = {line.split()[4]: line.split()[5].split(",") for line in fh}
    open("/tmp/mine", "w").close()
    context.set_state("out", {"root": mounts["/"], "tmp": sorted(os.listdir("/tmp")),
                              "proc": sorted(p for p in os.listdir("/proc") if p.isdigit()),
                              "loaded_with": LOADED_WITH})
"""


async def test_a_child_parked_for_sandboxes_makes_its_view_ahead_yet_loads_code_from_tmp(
    spawned: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its namespaces and read-only view are made, and the supervisor's environment wiped,
    while it waits; the private /tmp and its own /proc only at launch, once the state's code
    is loaded (here from a module under /tmp) and its log opened (through the supervisor's
    /proc). The module loads seeing the sandbox's environment, never the supervisor's."""
    assert str(tmp_path).startswith("/tmp/")
    monkeypatch.setenv("AGENT_TEST_SUPERVISOR_SECRET", "not for sandboxes")  # the zygote starts after this
    (tmp_path / "parked_view_state.py").write_text(textwrap.dedent(VIEW_STATE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import parked_view_state  # type: ignore[import-not-found]

    watch, pids = spawned
    agent = Agent("parked_view", isolation="sandbox")
    agent.add_state("look", parked_view_state.look, context_keys=["out"])
    await agent.run()
    watch()
    waiting = await parked_for_sandboxes(time.monotonic() + 60)
    for _ in range(3):
        out = (await agent.run()).get_state("out")
        assert "ro" in out["root"] and out["tmp"] == ["mine"] and out["proc"] == ["1"]
        assert "AGENT_TEST_SUPERVISOR_SECRET" not in out["loaded_with"]
        assert out["loaded_with"]["HOME"] == "/nonexistent" and out["loaded_with"]["TMPDIR"] == "/tmp"
        assert "from a module under /tmp" in read_attempt_log(agent.run_id, "look", 1)
    assert waiting & set(pids)


def parked_leases() -> dict[str, int]:
    """owner -> uid of the sandbox uids leased ahead for parked children."""
    pool = current_supervisor().confiner._uid_pool  # type: ignore[union-attr]
    return {owner: uid for owner, uid in (pool.leased() if pool else {}).items() if owner.startswith("parked-")}


async def ready_for_sandboxes(deadline: float) -> dict[int, int]:
    """pid -> uid of the children parked for sandboxed launches whose cgroup and uid are ready."""
    while time.monotonic() < deadline:
        ready = current_supervisor().parked_children._ready[True]  # type: ignore[union-attr]
        if ready:
            return {pid: made.lease.uid for pid, made in ready.items()}
        await asyncio.sleep(0.01)  # made on the confiner's thread, reported on this loop
    raise AssertionError("no child parked for sandboxed launches got its cgroup and uid")


@pytest.mark.timeout(240)  # a few sandboxed runs: minutes on an emulated machine
async def test_a_child_parked_for_sandboxes_holds_its_uid_ahead_and_gives_it_back(
    spawned: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Kept between launches however slow the machine (an emulated one takes seconds per launch).
    monkeypatch.setenv("AGENT_PARKED_IDLE", "120")
    watch, pids = spawned
    agent = Agent("uid_ahead", isolation="sandbox")
    agent.add_state("uid", escapes.note_uid, context_keys=["uid"])
    await agent.run()
    watch()
    deadline = time.monotonic() + 40
    served = None
    while served is None and time.monotonic() < deadline:  # until a launch takes a ready parked child
        ready = await ready_for_sandboxes(deadline)
        assert set(ready.values()) <= set(parked_leases().values())
        uid = (await agent.run()).get_state("uid")
        served = next((pid for pid in pids if pid in ready), None)
    assert served is not None and uid == ready[served]  # the launch took a parked child, and its uid
    # A parked child that dies gives its uid back.
    ready = await ready_for_sandboxes(time.monotonic() + 40)
    victim, victim_uid = next(iter(ready.items()))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 40
    while victim_uid in parked_leases().values() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert victim_uid not in parked_leases().values()
