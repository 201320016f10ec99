"""Supervisor side of the ``sandbox`` isolation level: one unprivileged uid per running state.

A sandboxed state runs as a uid of its own from a configured range (default
200000-200999, ``AGENT_SANDBOX_UIDS=lo-hi``), so states cannot signal, ptrace or read
each other's files and environment. A uid is *leased* by holding an exclusive
``flock`` on ``<lock dir>/<uid>.lock``: the kernel drops the lock when the holder
dies, so a crashed supervisor never leaks a uid, and two supervisors on one machine
never hand out the same one. Before a uid is handed out and after it is given back,
every process still running as that uid is killed, so two states never share one.

Each lease also gets a private temporary directory (0700, owned by the uid, removed
on release) that the child mounts over its own ``/tmp``. :func:`sandbox_spec` turns a lease into the plain dict that the child
applies with :func:`agent.runtime.sandbox.enter_sandbox`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import IsolationUnavailableError

UIDS_ENV = "AGENT_SANDBOX_UIDS"
LOCK_DIR_ENV = "AGENT_SANDBOX_LOCK_DIR"
DEFAULT_UIDS = range(200000, 201000)
DEFAULT_LOCK_DIR = "/run/agent-sandbox"

DEFAULT_NOFILE = 256
DEFAULT_NPROC = 128
# Variables a sandboxed state keeps; everything else of the supervisor's is dropped.
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


def parse_uid_range(text: str) -> range:
    """``"200000-200999"`` -> ``range(200000, 201000)``; raises on anything else."""
    try:
        lo_text, hi_text = text.split("-")
        lo, hi = int(lo_text), int(hi_text)
    except ValueError:
        raise IsolationUnavailableError(
            f"{UIDS_ENV}={text!r} is not a uid range: write it as lo-hi, e.g. 200000-200999"
        ) from None
    if lo <= 0 or hi < lo or hi >= 2**32 - 1:
        raise IsolationUnavailableError(
            f"{UIDS_ENV}={text!r}: uids must satisfy 0 < lo <= hi < 4294967295 (uid 0 is root)"
        )
    return range(lo, hi + 1)


def configured_uids() -> range:
    """The sandbox uid range from ``AGENT_SANDBOX_UIDS``, or the default."""
    text = os.environ.get(UIDS_ENV)
    return parse_uid_range(text) if text else DEFAULT_UIDS


def unavailable_reason() -> str | None:
    """Why sandboxes cannot be made by this process, or None when they can."""
    if os.geteuid() != 0:
        return (
            "sandbox isolation needs root (to switch uid and create a network namespace); "
            "run the supervisor as root, e.g. under agentd, or use isolation='process'"
        )
    return None


def kill_uid(uid: int) -> None:
    """SIGKILL every process running as ``uid``.

    Done by a short-lived helper that becomes ``uid`` and calls ``kill(-1)``, which
    reaches exactly the processes that uid may signal: its own.
    """
    try:
        subprocess.run(
            ["kill", "-KILL", "-1"],
            user=uid,
            group=uid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise IsolationUnavailableError(
            f"cannot clear sandbox uid {uid} (running kill(1) as that uid failed: {exc}); "
            "the supervisor must run as root with /usr/bin/kill installed"
        ) from exc


@dataclass(frozen=True)
class SandboxLease:
    """One uid handed to one owner (a state attempt), with its private temporary directory."""

    owner: str
    uid: int
    gid: int
    tmpdir: str

    def spec(self, *, nofile: int = DEFAULT_NOFILE, nproc: int = DEFAULT_NPROC) -> dict[str, Any]:
        return sandbox_spec(self.uid, gid=self.gid, tmpdir=self.tmpdir, nofile=nofile, nproc=nproc)


def sandbox_spec(
    uid: int,
    *,
    gid: int | None = None,
    tmpdir: str | None = None,
    nofile: int = DEFAULT_NOFILE,
    nproc: int = DEFAULT_NPROC,
) -> dict[str, Any]:
    """Plain data for :func:`agent.runtime.sandbox.enter_sandbox` (crosses the fork as is)."""
    return {
        "uid": uid,
        "gid": uid if gid is None else gid,
        "home": "/nonexistent",
        "tmpdir": tmpdir,
        "private_tmp": True,
        "network": False,
        "rlimits": {"nofile": nofile, "nproc": nproc, "core": 0},
        "env_keep": list(ENV_KEEP),
    }


@dataclass(frozen=True)
class UidPoolStatistics:
    total: int
    leased: int


class UidPool:
    """Leases sandbox uids, one per owner; thread-safe and safe across processes."""

    def __init__(
        self,
        uids: range | None = None,
        *,
        lock_dir: str | None = None,
        tmp_root: str | None = None,
    ) -> None:
        self.uids = uids if uids is not None else configured_uids()
        if len(self.uids) == 0 or self.uids.start <= 0:
            raise IsolationUnavailableError(f"sandbox uid range {self.uids} is empty or includes root")
        self.lock_dir = lock_dir or os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR
        self.tmp_root = tmp_root or tempfile.gettempdir()
        self._mutex = threading.Lock()
        self._leases: dict[str, tuple[SandboxLease, int]] = {}
        self._cursor = 0

    def lease(self, owner: str) -> SandboxLease:
        """A uid nobody else holds, with nothing running as it; raises when all are taken."""
        with self._mutex:
            if owner in self._leases:
                raise IsolationUnavailableError(f"{owner!r} already holds sandbox uid {self._leases[owner][0].uid}")
            self._prepare_lock_dir()
            mine = {lease.uid for lease, _ in self._leases.values()}
            count = len(self.uids)
            for step in range(count):
                position = (self._cursor + step) % count
                uid = self.uids[position]
                if uid in mine:
                    continue
                fd = self._try_lock(uid)
                if fd is not None:
                    self._cursor = position + 1
                    break
            else:
                raise IsolationUnavailableError(
                    f"all {count} sandbox uids ({self.uids.start}-{self.uids.stop - 1}) are in use; "
                    f"widen the range with {UIDS_ENV}=lo-hi"
                )
            try:
                kill_uid(uid)  # anything left over from a supervisor that crashed
                tmpdir = tempfile.mkdtemp(prefix=f"agent-sandbox-{uid}-", dir=self.tmp_root)
                os.chown(tmpdir, uid, uid)
            except BaseException:
                self._unlock(uid, fd)
                raise
            lease = SandboxLease(owner=owner, uid=uid, gid=uid, tmpdir=tmpdir)
            self._leases[owner] = (lease, fd)
            return lease

    def release(self, owner: str) -> None:
        """Kill what still runs as the owner's uid, remove its tmpdir, free the uid (idempotent)."""
        with self._mutex:
            held = self._leases.pop(owner, None)
            if held is None:
                return
            lease, fd = held
            try:
                kill_uid(lease.uid)
                shutil.rmtree(lease.tmpdir, ignore_errors=True)
            finally:
                self._unlock(lease.uid, fd)

    def leased(self) -> dict[str, int]:
        """owner -> uid for every lease held by this pool."""
        with self._mutex:
            return {owner: lease.uid for owner, (lease, _) in self._leases.items()}

    def statistics(self) -> UidPoolStatistics:
        with self._mutex:
            return UidPoolStatistics(total=len(self.uids), leased=len(self._leases))

    def close(self) -> None:
        """Release every lease (the supervisor is shutting down)."""
        for owner in list(self.leased()):
            self.release(owner)

    def _prepare_lock_dir(self) -> None:
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        info = os.lstat(self.lock_dir)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise IsolationUnavailableError(
                f"sandbox lock directory {self.lock_dir} must be a directory owned by uid {os.geteuid()} "
                f"and writable by it only; fix it or point {LOCK_DIR_ENV} elsewhere"
            )

    def _lock_path(self, uid: int) -> str:
        return os.path.join(self.lock_dir, f"{uid}.lock")

    def _try_lock(self, uid: int) -> int | None:
        path = self._lock_path(uid)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # The previous holder unlinks the file before unlocking; if it did so between
            # our open and flock we locked a dead inode: try again with a fresh file.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _unlock(self, uid: int, fd: int) -> None:
        try:
            os.unlink(self._lock_path(uid))
        except FileNotFoundError:
            pass
        os.close(fd)
