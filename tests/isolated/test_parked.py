"""Parked children: forked ahead, connected to the supervisor ahead, each serving one attempt."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.context import Context
from agent.runtime.child import cores_busy
from agent.supervisor import current_supervisor, shutdown_supervisor

from .helpers import files_under, make_attempt, run


async def own_pid(context: Context) -> int:
    return os.getpid()


def peers_of_this_process() -> set[int]:
    """Pids at the other end of this process's Unix sockets (the supervisor's accepted connections)."""
    peers = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_UNIX:
                pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                peers.add(pid)
        except OSError:
            pass
        finally:
            sock.close()
    return peers


async def wait_for_connected_parked_child(deadline: float) -> int:
    """A parked child that already holds a connection to the supervisor."""
    sup = current_supervisor()
    assert sup is not None
    while time.monotonic() < deadline:
        connected = sup.parked & peers_of_this_process()
        if connected:
            return connected.pop()
        await asyncio.sleep(0.01)  # the zygote's reports come in on this loop
    raise AssertionError(f"no parked child connected ahead (parked: {sup.parked})")


async def test_a_parked_child_connects_ahead_and_serves_one_attempt() -> None:
    first = (await run(make_attempt(own_pid))).result  # launches make the zygote park children
    parked = await wait_for_connected_parked_child(time.monotonic() + 60)
    served = set()
    for number in range(2, 6):  # a launch takes a parked child when one is ready
        served.add((await run(make_attempt(own_pid, number=number))).result)
    assert parked in served
    assert first not in served  # each attempt had a fresh process
    assert len(served) == 4


async def test_a_parked_child_is_named_until_launched() -> None:
    """``ps`` tells parked children from state processes."""
    await run(make_attempt(own_pid))
    parked = await wait_for_connected_parked_child(time.monotonic() + 60)
    with open(f"/proc/{parked}/comm") as fh:
        assert fh.read().strip() == "agent-parked"

    async def own_name(context: Context) -> tuple[int, str]:
        with open("/proc/self/comm") as fh:
            return os.getpid(), fh.read().strip()

    served = dict([(await run(make_attempt(own_name, number=n))).result for n in range(2, 6)])
    assert parked in served
    assert "agent-parked" not in served.values()


@pytest.fixture
def parked_for_good(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A supervisor of its own whose parked children are not let go for lack of launches."""
    shutdown_supervisor()
    monkeypatch.setenv("AGENT_PARKED_IDLE", "600")
    yield
    shutdown_supervisor()


@pytest.mark.usefixtures("parked_for_good")
async def test_the_zygote_replaces_a_parked_child_once_it_said_hello() -> None:
    # Told at the hand-over, the zygote forked the replacement while the launched child was
    # still starting, on the same cores; it is told once that child has said hello.
    await run(make_attempt(own_pid))
    sup = current_supervisor()
    assert sup is not None
    parked = await wait_for_connected_parked_child(time.monotonic() + 60)
    told: list[tuple[int, set[str]]] = []
    tell = sup.zygote.taken

    def taken(pid: int, sandbox: bool = False) -> None:
        # Handed its spec but not yet known as its pid's child: still launching.
        told.append((pid, {child.status.value for child in sup._by_secret.values() if child.pid == pid}
                     or {"launching"}))
        tell(pid, sandbox)

    sup.zygote.taken = taken  # type: ignore[method-assign]
    try:
        served = [(await run(make_attempt(own_pid, number=n))).result for n in range(2, 6)]
    finally:
        del sup.zygote.taken
    assert parked in served
    assert {pid for pid, _ in told} <= set(served)
    assert [pid for pid, _ in told if pid == parked] == [parked]  # once
    assert all(statuses <= {"running", "reported"} for _, statuses in told), told
    assert not sup._untold
    await wait_for_connected_parked_child(time.monotonic() + 60)  # replaced


@pytest.mark.usefixtures("parked_for_good")
async def test_a_parked_child_that_dies_before_a_launch_is_replaced() -> None:
    await run(make_attempt(own_pid))
    sup = current_supervisor()
    assert sup is not None
    deadline = time.monotonic() + 60
    while len(sup.parked & peers_of_this_process()) < 2:  # as many as the zygote keeps after one launch
        assert time.monotonic() < deadline, f"fewer than two children parked: {sup.parked}"
        await asyncio.sleep(0.01)
    before = set(sup.parked)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)  # ours: forked by our supervisor's zygote
    deadline = time.monotonic() + 30
    while victim in sup.parked or not sup.parked - before:
        assert time.monotonic() < deadline, f"parked {sorted(sup.parked)}; {victim} killed, none new"
        await asyncio.sleep(0.01)  # the zygote's reports come in on this loop
    assert (await run(make_attempt(own_pid, number=2))).result != victim


@pytest.mark.parametrize(("ran", "waited", "busy"), [(1000, 1501, True), (1000, 1500, False), (1000, 0, False)])
def test_cores_busy_is_a_wait_for_a_core_much_longer_than_the_run(
    tmp_path: Any, ran: int, waited: int, busy: bool
) -> None:
    counts = tmp_path / "schedstat"
    counts.write_text(f"{ran} {waited} 3\n")
    assert cores_busy(str(counts)) is busy


@pytest.mark.parametrize("text", [None, "", "12 many 3\n"])
def test_cores_busy_without_counts_says_idle(tmp_path: Any, text: str | None) -> None:
    # No counts (a kernel without schedstats) or unreadable ones: the child warms up, as it did.
    counts = tmp_path / "schedstat"
    if text is not None:
        counts.write_text(text)
    assert cores_busy(str(counts)) is False


@pytest.mark.usefixtures("parked_for_good")
async def test_launches_while_the_cores_are_busy_are_served_by_fresh_children() -> None:
    # Processes of a higher priority than ours take every core: most children parked
    # meanwhile wait for a core longer than they run and skip their warm-up (which one
    # does depends on the scheduler); each launch is still served, in a process of its own.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(-5))
            for _ in range(2 * len(os.sched_getaffinity(0)))]
    try:
        await run(make_attempt(own_pid))
        parked = await wait_for_connected_parked_child(time.monotonic() + 30)
        served = [(await run(make_attempt(own_pid, number=n))).result for n in range(2, 8)]
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
    assert parked in served
    assert len(set(served)) == len(served)


async def test_a_worker_started_while_a_child_is_parked_can_be_that_child() -> None:
    """A parked child waits for its spec inside a run of its event loop; a worker's spec
    takes it out of that run (the worker runs the loop itself) and it serves attempts."""
    from . import helpers
    from agent.executor import Isolation

    shutdown_supervisor()  # no idle worker of an earlier test
    await run(make_attempt(own_pid))
    sup = current_supervisor()
    assert sup is not None
    deadline = time.monotonic() + 60
    while not sup.parked_children._ready[False]:  # its cgroup made: a launch can take it
        assert time.monotonic() < deadline, "no child was parked"
        await asyncio.sleep(0.01)
    parked = set(sup.parked_children._ready[False])
    helpers.LEVEL = Isolation.WORKER
    try:
        pids = {(await run(make_attempt(own_pid, number=n))).result for n in (1, 2, 3)}
    finally:
        helpers.LEVEL = Isolation.PROCESS
    assert len(pids) == 1 and pids <= parked  # the one worker, which was a parked child


async def test_shutdown_closes_the_files_of_children_still_parked() -> None:
    # A parked child's cgroup files are opened while it waits; a supervisor that shuts
    # down with children still parked must close them (a long-lived process would else
    # run out of descriptors, one supervisor after another).
    await run(make_attempt(own_pid))
    sup = current_supervisor()
    assert sup is not None
    dirs = sup.confiner.backend.owned_dirs()
    if not dirs:
        pytest.skip("no cgroups here: parked children get none")
    deadline = time.monotonic() + 60
    while not files_under(dirs):  # a parked child's cgroup is made on the confiner's thread
        assert time.monotonic() < deadline, "no parked child's cgroup files were opened"
        await asyncio.sleep(0.01)
    shutdown_supervisor()
    assert files_under(dirs) == []


async def test_children_nobody_launches_are_let_go_with_their_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    # The zygote says when nobody launches; only the supervisor holds the parked children's
    # sockets, so it lets them go: each exits, its cgroup goes, and launching parks again.
    shutdown_supervisor()
    monkeypatch.setenv("AGENT_PARKED_IDLE", "1")
    try:
        await run(make_attempt(own_pid))
        sup = current_supervisor()
        assert sup is not None
        dirs = sup.confiner.backend.owned_dirs()
        parked = {await wait_for_connected_parked_child(time.monotonic() + 60)}
        deadline = time.monotonic() + 60
        while sup.parked or len(sup.parked_children):
            assert time.monotonic() < deadline, f"parked children never let go: {sup.parked}"
            parked |= sup.parked
            await asyncio.sleep(0.05)  # their exits are reported on this loop
        assert not any(os.path.exists(f"/proc/{pid}") for pid in parked)
        assert not parked & peers_of_this_process()
        while any(name.startswith("parked-") for d in dirs for name in os.listdir(d)):
            assert time.monotonic() < deadline, "a let-go child's cgroup is still there"
            await asyncio.sleep(0.05)  # removed on the confiner's thread
        assert (await run(make_attempt(own_pid, number=2))).result not in parked
        await wait_for_connected_parked_child(time.monotonic() + 60)  # parked again
    finally:
        shutdown_supervisor()


async def test_children_let_go_exit_while_a_process_forked_from_the_supervisors_lives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # multiprocessing forks the caller's process: a copy of a parked child's socket there
    # would keep the child parked (and its cgroup) after the supervisor let it go.
    shutdown_supervisor()
    monkeypatch.setenv("AGENT_PARKED_IDLE", "1")
    read_end, write_end = os.pipe()
    forked = None
    try:
        await run(make_attempt(own_pid))
        sup = current_supervisor()
        assert sup is not None
        parked = {await wait_for_connected_parked_child(time.monotonic() + 60)} | sup.parked
        forked = os.fork()
        if forked == 0:  # pragma: no cover - lives, holding what it inherited, until told
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        deadline = time.monotonic() + 30  # AGENT_PARKED_IDLE, then an exit each
        while any(os.path.exists(f"/proc/{pid}") for pid in parked):
            assert time.monotonic() < deadline, f"parked children {sorted(parked)} were not let go"
            await asyncio.sleep(0.05)
    finally:
        os.close(write_end)  # the forked process ends
        os.close(read_end)
        if forked:
            os.waitpid(forked, 0)
        shutdown_supervisor()


async def park_behind(gate: threading.Event) -> Any:
    """The supervisor, once a launch took a parked child and the zygote parked another,
    whose cgroup waits to be made: the confiner's thread, which makes it, waits for ``gate``."""
    await run(make_attempt(own_pid))
    sup = current_supervisor()
    assert sup is not None
    deadline = time.monotonic() + 60
    while not sup.parked_children._ready[False]:
        assert time.monotonic() < deadline, "no child was parked"
        await asyncio.sleep(0.01)
    sup.confiner.background(gate.wait)  # cgroups are made on this thread: hold it
    await run(make_attempt(own_pid, number=2))  # takes the parked child: the zygote parks another
    while not sup.parked_children._making:
        assert time.monotonic() < deadline, "no child was parked after the launch"
        await asyncio.sleep(0.01)
    return sup


def test_a_child_parked_as_its_loop_ended_serves_the_next_loop() -> None:
    # asyncio.run() twice: the first loop stops while a parked child's cgroup is being made,
    # so the call that would take the child in never runs there. The next loop the
    # supervisor serves takes it in: it serves a launch, rather than staying counted as
    # parked by the zygote, in a cgroup nobody removes.
    shutdown_supervisor()
    gate, done = threading.Event(), threading.Event()

    async def park_while_the_confiner_waits() -> set[int]:
        return set((await park_behind(gate)).parked_children._making)

    first = asyncio.new_event_loop()
    try:
        making = first.run_until_complete(park_while_the_confiner_waits())  # then the loop stops
        sup = current_supervisor()
        assert sup is not None
        gate.set()
        sup.confiner.background(done.set)
        assert done.wait(60), "the confiner's thread never got past the parked child's cgroup"
        first.close()

        async def launch_until_served() -> set[int]:
            served: set[int] = set()
            for number in range(3, 3 + 2 * len(making) + 2):  # ready ones go first, oldest first
                served.add((await run(make_attempt(own_pid, number=number))).result)
                if making <= served:
                    break
            return served

        assert making <= asyncio.run(launch_until_served())
    finally:
        gate.set()
        if not first.is_closed():
            first.close()
        shutdown_supervisor()


def test_a_child_parked_as_the_supervisor_shuts_down_goes_without_a_warning() -> None:
    # The zygote removes the supervisor's cgroups as it exits: a parked child's cgroup made
    # after that cannot be, which is the shutdown, not a failure worth a warning.
    shutdown_supervisor()
    gate = threading.Event()
    try:
        sup = asyncio.run(park_behind(gate))
        if not sup.confiner.backend.owned_dirs():
            pytest.skip("no cgroups here: parked children get none")
        warned: list[str] = []
        sup.parked_children._log = type("Log", (), {"warning": lambda self, event, **_: warned.append(event)})()
        close_zygote = sup.zygote.close

        def close_then_release(*args: Any, **kwargs: Any) -> None:
            close_zygote(*args, **kwargs)
            gate.set()  # the parked child's cgroup is made now, its parent gone

        sup.zygote.close = close_then_release  # type: ignore[method-assign]
        shutdown_supervisor()
        assert warned == []
    finally:
        gate.set()
        shutdown_supervisor()
