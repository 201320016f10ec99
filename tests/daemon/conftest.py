"""Fixtures for agentd: two real users, a world-traversable directory, a running agentd checked clean."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Agentd, User, processes_of, wait_until

USERS = ("ann", "bob")
USERS_GROUP = 100  # "users" on Debian


def _can_run() -> str | None:
    if os.geteuid() != 0:
        return "agentd needs root"
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        return "these tests expect cgroup v1 (the v2 variant runs in the guest)"
    if shutil.which("useradd") is None:
        return "needs useradd"
    return None


@pytest.fixture(scope="session")
def users() -> Iterator[tuple[User, User]]:
    """Two users made for the session and removed afterwards. Their names are the session's
    own (``agt<pid>-ann``), and the system picks their uids: another test session on the
    machine has its own two, which this one never removes."""
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    made: list[User] = []
    try:
        for short in USERS:
            name = f"agt{os.getpid()}-{short}"
            subprocess.run(["useradd", "-M", "-N", "-g", str(USERS_GROUP), "-d", "/nonexistent",
                            "-s", "/usr/sbin/nologin", name], check=True)
            made.append(User(name, pwd.getpwnam(name).pw_uid, USERS_GROUP))
        yield made[0], made[1]
    finally:
        for user in made:
            subprocess.run(["userdel", user.name], check=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory every user can read (tmp_path lives under root's 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="agentd-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def outdir(workdir: Path) -> Path:
    """A directory every job's states may write to (as any user)."""
    out = workdir / "out"
    out.mkdir()
    out.chmod(0o777)
    return out


@pytest.fixture
def agentd(workdir: Path, users: tuple[User, User]) -> Iterator[Agentd]:
    """A running agentd; afterwards: stopped cleanly, no process of the test users, no cgroup left."""
    daemon = Agentd(workdir)
    try:
        yield daemon
    finally:
        started = daemon.proc is not None
        dirs = daemon.incarnation_dirs() if started else []
        code = daemon.stop()
        uids = {u.uid for u in users}
        wait_until(lambda: not processes_of(uids), "the test users' processes to end", timeout=30)
        if started:
            assert code == 0, daemon.log_text()[-3000:]
            left = [d for d in dirs if os.path.exists(d)]
            assert not left, f"agentd left cgroups behind: {left}"
