"""Coordination under agentd is box-wide (DESIGN item 12): a MUTEX on a state name holds
across every job and script of a user, isolated states included; users do not share names."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import protocol

from .helpers import Agentd, User, running_as, shared_file, wait_until, write_workflow

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

# One state under a primitive named after it, holding it until its release file appears.
GUARDED = '''
import asyncio, os
from agent.coordination import create_coordinated_agent, PrimitiveType

agent = create_coordinated_agent("{name}")
agent.add_state_coordination("database_write", PrimitiveType.{kind})

async def database_write(context):
    with open({out!r}, "a") as f:
        f.write("{name} start\\n")
    while not os.path.exists({release!r}):
        await asyncio.sleep(0.05)
    with open({out!r}, "a") as f:
        f.write("{name} end\\n")

agent.add_state("database_write", database_write, max_retries=0)
'''


# The same, with the mutex taken by the state's code (from its own process).
IN_CODE = '''
import asyncio, os
from agent import Agent
from agent.coordination import mutex

agent = Agent("{name}")

async def database_write(context):
    async with mutex("database_write"):
        with open({out!r}, "a") as f:
            f.write("{name} start\\n")
        while not os.path.exists({release!r}):
            await asyncio.sleep(0.05)
        with open({out!r}, "a") as f:
            f.write("{name} end\\n")

agent.add_state("database_write", database_write, max_retries=0)
'''


def _flow(workdir: Path, outdir: Path, events: Path, name: str, kind: str = "MUTEX") -> Path:
    template = IN_CODE if kind == "in code" else GUARDED
    return write_workflow(workdir, f"{name}.py", template.format(name=name, kind=kind, out=str(events),
                                                                 release=str(outdir / f"{name}-go")))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _primitive(agentd: Agentd, user: User) -> dict[str, Any]:
    """agentd's ``database_write`` for ``user``, as agentctl top shows it to that user."""
    coordination = agentd.ctl_json("top", user=user)["coordination"]
    assert set(coordination) <= {user.name}, "a user sees only their own coordination"
    return coordination.get(user.name, {}).get("primitives", {}).get("database_write", {})


@pytest.fixture
def events(outdir: Path) -> Path:
    return shared_file(outdir, "events.txt")


def _script(agentd: Agentd, user: User, flow: Path, workdir: Path) -> Iterator[subprocess.Popen[str]]:
    """``agent run FLOW`` as ``user``, admitted by agentd (AGENT_DAEMON=1)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "AGENT_DAEMON": "1",
           "AGENT_SOCKET": agentd.socket, "HOME": "/nonexistent"}
    return running_as(user, [str(Path(sys.executable).parent / "agent"), "run", "--json", str(flow)], env, workdir)


@pytest.mark.parametrize("second, kind", [("job", "MUTEX"), ("script", "MUTEX"), ("job", "in code")])
def test_a_mutex_holds_across_jobs_and_scripts_of_a_user(second: str, kind: str, agentd: Agentd,
                                                         users: tuple[User, User], workdir: Path, outdir: Path,
                                                         events: Path) -> None:
    ann, _ = users
    agentd.start()
    first = agentd.submit(_flow(workdir, outdir, events, "first", kind), user=ann)
    wait_until(lambda: _lines(events) == ["first start"], "the first job to hold the mutex")
    assert _primitive(agentd, ann)["owners"] == [f"job {first}/first/" + _run_of(agentd, first) + "/database_write#1"]

    flow = _flow(workdir, outdir, events, "second", kind)
    if second == "job":
        other = agentd.submit(flow, user=ann)
        _wait_in_agentd(agentd, ann)
        (outdir / "first-go").touch()
        wait_until(lambda: _lines(events)[-1:] == ["second start"], "the second job to take the mutex")
        (outdir / "second-go").touch()
        assert agentd.wait_status(other, "completed", "failed")["status"] == "completed"
    else:
        with _script(agentd, ann, flow, workdir) as run:
            _wait_in_agentd(agentd, ann)
            (outdir / "first-go").touch()
            wait_until(lambda: _lines(events)[-1:] == ["second start"], "the script to take the mutex")
            (outdir / "second-go").touch()
            stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
    assert agentd.wait_status(first, "completed", "failed")["status"] == "completed"
    assert _lines(events) == ["first start", "first end", "second start", "second end"]
    wait_until(lambda: _primitive(agentd, ann).get("owners", []) == [], "agentd's mutex to be free again")


def _run_of(agentd: Agentd, job: str) -> str:
    return str(agentd.status(job)["run_id"])[:8]


def _wait_in_agentd(agentd: Agentd, user: User) -> None:
    """The second state waits for the mutex in agentd (it is free in its own process)."""
    wait_until(lambda: _primitive(agentd, user).get("wait_count") == 1, "the second state to wait in agentd")


def test_users_do_not_share_names(agentd: Agentd, users: tuple[User, User], workdir: Path, outdir: Path,
                                  events: Path) -> None:
    ann, bob = users
    agentd.start()
    held = agentd.submit(_flow(workdir, outdir, events, "ann"), user=ann)
    wait_until(lambda: _lines(events) == ["ann start"], "ann's job to hold her mutex")
    # bob's SEMAPHORE of the same name is his own: neither its settings nor ann's holding stop him.
    other = agentd.submit(_flow(workdir, outdir, events, "bob", kind="SEMAPHORE, max_count=2"), user=bob)
    wait_until(lambda: _lines(events) == ["ann start", "bob start"], "bob's job to run beside ann's")
    assert _primitive(agentd, bob)["type"] == "semaphore"
    assert agentd.ctl_json("top")["coordination"].keys() == {ann.name, bob.name}  # root sees every user's
    for name, job in (("ann", held), ("bob", other)):
        (outdir / f"{name}-go").touch()
        assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"


def test_a_cancelled_holder_gives_back_and_other_settings_are_refused(
        agentd: Agentd, users: tuple[User, User], workdir: Path, outdir: Path, events: Path) -> None:
    ann, _ = users
    agentd.start()
    holder = agentd.submit(_flow(workdir, outdir, events, "holder"), user=ann)
    wait_until(lambda: _lines(events) == ["holder start"], "the holder to take the mutex")

    # Another job of ann's that makes the name a SEMAPHORE is refused, naming the job that declares it.
    clash = agentd.submit(_flow(workdir, outdir, events, "clash", kind="SEMAPHORE, max_count=3"), user=ann)
    status = agentd.wait_status(clash, "completed", "failed")
    assert status["status"] == "failed"
    assert f"job {holder} (user {ann.name})" in status["error"] and "MUTEX" in status["error"]

    waiter = agentd.submit(_flow(workdir, outdir, events, "waiter"), user=ann)
    _wait_in_agentd(agentd, ann)
    # The holder's runner ends without releasing anything itself: agentd gives its mutex back.
    assert agentd.ctl("cancel", holder, user=ann).returncode == 0
    wait_until(lambda: _lines(events)[-1:] == ["waiter start"], "the waiter to take the freed mutex")
    (outdir / "waiter-go").touch()
    assert agentd.wait_status(waiter, "completed", "failed")["status"] == "completed"
    assert _lines(events) == ["holder start", "waiter start", "waiter end"]


RATE_LIMITED = '''
from agent.coordination import create_coordinated_agent, RateLimitStrategy

agent = create_coordinated_agent("{name}")
agent.add_state_rate_limit("api_call", max_rate=0.001, strategy=RateLimitStrategy.LEAKY_BUCKET)

async def api_call(context):
    with open({out!r}, "a") as f:
        f.write("{name} called\\n")

agent.add_state("api_call", api_call, max_retries=0)
'''


def test_a_rate_limit_spaces_starts_across_jobs(agentd: Agentd, users: tuple[User, User], workdir: Path,
                                                events: Path) -> None:
    ann, bob = users
    agentd.start()

    def flow(name: str) -> Path:
        return write_workflow(workdir, f"{name}.py", RATE_LIMITED.format(name=name, out=str(events)))

    def limiter(user: User) -> dict[str, Any]:
        return agentd.ctl_json("top", user=user)["coordination"].get(user.name, {}).get("rate_limiters", {}).get(
            "api_call", {})

    first = agentd.submit(flow("first"), user=ann)
    assert agentd.wait_status(first, "completed", "failed")["status"] == "completed"
    # A new process's own limiter would let the next call start at once; agentd's spaces it
    # 1,000 s after the first job's.
    second = agentd.submit(flow("second"), user=ann)
    wait_until(lambda: limiter(ann).get("wait_count") == 1, "the second job's call to wait in agentd")
    assert limiter(ann)["admitted"] == 1 and _lines(events) == ["first called"]
    other = agentd.submit(flow("bob"), user=bob)  # another user's limit of the same name is their own
    assert agentd.wait_status(other, "completed", "failed")["status"] == "completed"
    assert agentd.ctl("cancel", second, user=ann).returncode == 0
    wait_until(lambda: limiter(ann).get("wait_count") == 0, "the cancelled job's wait to be withdrawn")
    assert _lines(events) == ["first called", "bob called"]


MUTEX = {"type": "mutex", "ttl": None, "max_count": None, "quota_limit": None, "wait_timeout": None}


def _connect(agentd: Agentd) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(agentd.socket)
    sock.sendall(protocol.encode(protocol.hello("admission")))
    assert _read(sock)["op"] == "welcome"
    return sock


def _read(sock: socket.socket) -> dict[str, Any]:
    frames = protocol.FrameBuffer()
    while True:
        data = sock.recv(65536)
        assert data, "agentd closed the connection"
        got = frames.feed(data)
        if got:
            return got[0]  # type: ignore[no-any-return]


def _take(sock: socket.socket, number: int, name: str = "m", **fields: Any) -> None:
    sock.sendall(protocol.encode({"op": "coordinate", "t": number, "kind": "primitive", "name": name,
                                  "settings": MUTEX, "owner": "o", "amount": 1.0, "timeout": None, **fields}))


@pytest.mark.parametrize("fields, error", [
    ({"kind": "lock"}, "unknown kind of coordination 'lock'"),
    ({"settings": {**MUTEX, "type": "barrier", "max_count": 2}}, "counts the arrivals of one run"),
    ({"settings": {**MUTEX, "type": "gate"}}, "unknown primitive type 'gate'"),
    ({"settings": {"type": "mutex"}}, "'ttl'"),
    ({"settings": {**MUTEX, "ttl": -1}}, "ttl"),
    ({"name": "x" * 201}, "1 to 200 characters"),
    ({"amount": 2.0}, "capacity is 1"),
])
def test_a_bad_take_is_refused_and_the_connection_serves_on(fields: dict[str, Any], error: str,
                                                            agentd: Agentd, users: tuple[User, User]) -> None:
    agentd.start()
    with _connect(agentd) as sock:
        _take(sock, 1, **fields)
        refused = _read(sock)
        assert refused["op"] == "coordination_refused" and refused["t"] == 1 and error in refused["error"]
        _take(sock, 2)
        assert _read(sock) == {"op": "coordinated", "t": 2}


@pytest.mark.parametrize("fields, error", [
    ({"t": float("inf")}, "OverflowError"),  # escaped the handler: no answer, the client waited for ever
    ({"owner": None}, "owner must be a str"),  # was held as the owner "None"
])
def test_a_malformed_take_ends_its_connection_only(fields: dict[str, Any], error: str, agentd: Agentd,
                                                   users: tuple[User, User]) -> None:
    agentd.start()
    with _connect(agentd) as sock, _connect(agentd) as other:
        _take(sock, 1, **fields)
        refused = _read(sock)
        assert refused["op"] == "error" and refused["code"] == "invalid" and error in refused["error"]
        assert sock.recv(1) == b""  # closed
        _take(other, 1)
        assert _read(other) == {"op": "coordinated", "t": 1}


def test_a_name_held_and_waited_for_by_connections_that_close_together_is_forgotten(
        agentd: Agentd, users: tuple[User, User]) -> None:
    """The waiter's grant, won as its connection closed, was given back after the close had
    dropped the unused names: the name stayed for good, counting against the user's cap."""
    agentd.start()
    for round_ in range(3):
        holder, waiter = _connect(agentd), _connect(agentd)
        _take(holder, 1, name=f"n{round_}")
        assert _read(holder) == {"op": "coordinated", "t": 1}
        _take(waiter, 1, name=f"n{round_}")
        name = f"n{round_}"
        wait_until(lambda name=name: agentd.ctl_json("top")["coordination"]["root"]["primitives"][name][
            "wait_count"] == 1, "the second connection to wait")
        holder.close()
        waiter.close()
        wait_until(lambda: agentd.ctl_json("top")["coordination"].get("root", {}).get("primitives", {}) == {},
                   "the name nobody holds or waits for to be forgotten")


def test_a_closed_connection_gives_back_and_withdraws(agentd: Agentd, users: tuple[User, User]) -> None:
    agentd.start()
    holder, waiter, leaver = _connect(agentd), _connect(agentd), _connect(agentd)
    with holder, waiter, leaver:
        _take(holder, 1)
        assert _read(holder) == {"op": "coordinated", "t": 1}
        _take(leaver, 1)
        _take(waiter, 1)
        wait_until(lambda: agentd.ctl_json("top")["coordination"]["root"]["primitives"]["m"]["wait_count"] == 2,
                   "both to wait for the mutex")
        text = agentd.ctl("top", "--once").stdout
        assert "root: MUTEX 'm' held by root pid " in text and ", 2 waiting" in text
        leaver.close()  # what a connection that goes holds or waits for is given back or withdrawn
        holder.close()
        assert _read(waiter) == {"op": "coordinated", "t": 1}
        waiter.sendall(protocol.encode({"op": "uncoordinate", "t": 1}))
        wait_until(lambda: agentd.ctl_json("top")["coordination"]["root"]["primitives"]["m"]["owners"] == [],
                   "the mutex to be given back")


RENEWING = '''
import asyncio
from agent.coordination import create_coordinated_agent, current_coordinator, current_owner, PrimitiveType

agent = create_coordinated_agent("{name}", isolation="inline")  # renew() is the state's own coordinator's
agent.add_state_coordination("report", PrimitiveType.LEASE, ttl=1.0)

async def report(context):
    with open({out!r}, "a") as f:
        f.write("{name} start\\n")
    lease = current_coordinator().primitive("report")
    for _ in range({renewals}):  # three times the lease's ttl, renewed as it goes
        await asyncio.sleep(0.25)
        lease.renew(current_owner())
    with open({out!r}, "a") as f:
        f.write("{name} end\\n")

agent.add_state("report", report, max_retries=0)
'''


def test_a_renewed_lease_is_renewed_in_agentd_too(agentd: Agentd, users: tuple[User, User], workdir: Path,
                                                  events: Path) -> None:
    ann, _ = users
    agentd.start()
    first = agentd.submit(write_workflow(workdir, "first.py", RENEWING.format(name="first", out=str(events),
                                                                              renewals=12)), user=ann)
    wait_until(lambda: _lines(events) == ["first start"], "the first job to take the lease")
    second = agentd.submit(write_workflow(workdir, "second.py", RENEWING.format(name="second", out=str(events),
                                                                                renewals=0)), user=ann)
    for job in (first, second):
        status = agentd.wait_status(job, "completed", "failed")
        assert status["status"] == "completed", status["error"]
    assert _lines(events) == ["first start", "first end", "second start", "second end"]


MANY_NAMES = '''
from agent import Agent
from agent.coordination import mutex

agent = Agent("names")

async def files(context):
    for i in range(20):
        async with mutex(f"file-{{i}}"):
            pass

agent.add_state("files", files)
'''


def test_names_nobody_uses_or_declares_are_forgotten(agentd: Agentd, users: tuple[User, User], workdir: Path,
                                                      outdir: Path, events: Path) -> None:
    """A name a state's code takes is kept while taken; one a job declares, while the job runs."""
    ann, _ = users
    agentd.start()
    job = agentd.submit(write_workflow(workdir, "names.py", MANY_NAMES), user=ann)
    assert agentd.wait_status(job, "completed", "failed")["status"] == "completed"
    held = agentd.submit(_flow(workdir, outdir, events, "held"), user=ann)
    wait_until(lambda: _lines(events) == ["held start"], "the job to hold its mutex")
    assert list(agentd.ctl_json("top", user=ann)["coordination"][ann.name]["primitives"]) == ["database_write"]
    (outdir / "held-go").touch()
    assert agentd.wait_status(held, "completed", "failed")["status"] == "completed"
    wait_until(lambda: agentd.ctl_json("top", user=ann)["coordination"][ann.name]["primitives"] == {},
               "the finished job's name to be forgotten")


@pytest.mark.parametrize("taken, isolation", [("declared", "inline"), ("in code", "inline"), ("in code", "process")])
def test_a_script_that_loses_agentd_while_holding_fails(taken: str, isolation: str, agentd: Agentd,
                                                         users: tuple[User, User], workdir: Path, outdir: Path,
                                                         events: Path) -> None:
    """A new agentd would hand the name to another job: the run that held it cannot go on as if
    it still excluded them. So too the run of a plain Agent whose state took the mutex in its
    code (it went on, holding nothing)."""
    ann, _ = users
    agentd.start()
    flow = _flow(workdir, outdir, events, "script", "in code" if taken == "in code" else "MUTEX")
    flow.write_text(flow.read_text().replace('gent("script")', f'gent("script", isolation="{isolation}")'))
    with _script(agentd, ann, flow, workdir) as run:
        wait_until(lambda: _lines(events) == ["script start"], "the script to hold the mutex")
        assert agentd.stop() == 0
        stdout, stderr = run.communicate(timeout=120)
    agentd.start()  # for the fixture's clean stop
    assert run.returncode == 1, stderr
    error = json.loads(stdout[stdout.index("{"):])["error"]
    assert error.startswith("lost the connection to agentd") and "while holding the box-wide 'database_write'" in error


# Two threads of one script, each with a run of its own on its own loop: the first holds
# database_write (declared) until told to go; the second runs meanwhile.
THREADS = '''
import asyncio, os, threading
from agent import Agent
from agent.coordination import create_coordinated_agent, mutex, PrimitiveType

def log(line):
    with open({out!r}, "a") as f:
        f.write(line + "\\n")

holder = create_coordinated_agent("holder", isolation="inline")
holder.add_state_coordination("database_write", PrimitiveType.MUTEX)

async def database_write(context):
    log("holder start")
    while not os.path.exists({release!r}):
        await asyncio.sleep(0.05)
    log("holder end")

holder.add_state("database_write", database_write, max_retries=0)
other = Agent("other", isolation="inline")

async def elsewhere(context):
    async with mutex("another_name"):
        log("other ran")

other.add_state("elsewhere", elsewhere, max_retries=0)
first = threading.Thread(target=holder.run_sync)
first.start()
while not os.path.exists({out!r}) or "holder start" not in open({out!r}).read():
    threading.Event().wait(0.05)
second = threading.Thread(target=other.run_sync)
second.start()
second.join()
first.join()
'''


def test_runs_on_the_loops_of_two_threads_keep_what_they_hold(agentd: Agentd, users: tuple[User, User],
                                                              workdir: Path, outdir: Path, events: Path) -> None:
    """One connection served the whole process: a run on a second thread's loop replaced the
    first loop's, and agentd gave back the mutex the first run still held (no error, no
    exclusion left)."""
    ann, _ = users
    agentd.start()
    script = write_workflow(workdir, "threads.py", THREADS.format(out=str(events), release=str(outdir / "go")))
    env = {"PATH": "/usr/bin:/bin", "AGENT_DAEMON": "1", "AGENT_SOCKET": agentd.socket, "HOME": "/nonexistent"}
    with running_as(ann, [sys.executable, str(script)], env, workdir) as run:
        wait_until(lambda: _lines(events) == ["holder start", "other ran"], "the second thread's run to end")
        owners = _primitive(agentd, ann)["owners"]
        assert len(owners) == 1 and owners[0].endswith("/database_write#1"), owners
        (outdir / "go").touch()
        _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert _lines(events) == ["holder start", "other ran", "holder end"]
