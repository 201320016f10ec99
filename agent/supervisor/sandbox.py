"""Supervisor side of the ``sandbox`` isolation level: one unprivileged uid per running state.

A sandboxed state runs as a uid of its own from a configured range (default
200000-200999, ``AGENT_SANDBOX_UIDS=lo-hi``), in namespaces of its own (see
:mod:`agent.runtime.sandbox`), so states cannot signal, ptrace or read each other or
the supervisor. A uid is *leased* by holding an exclusive ``flock`` on
``<lock dir>/<uid>.lock``: the kernel drops the lock when the holder dies, so a crashed
supervisor never leaks a uid, and two supervisors on one machine never hand out the
same one.

The lease file is the uid's state: it exists while the uid is leased, and is removed
only once everything of the uid is gone (processes, System V and POSIX IPC objects,
files in the world-writable directories: :mod:`.uid_sweep`). A lease file that nobody
holds therefore marks a uid whose supervisor crashed: it is swept in full before it is
leased again, and every such uid is swept when a pool first leases. A uid may be leased
*ahead* for a launch still to come (a parked child's): nothing has run as it yet, so
a launch that finds every uid taken takes such a lease over instead of failing, and
the launch it was meant for leases another when it comes. A release kills
what still runs as the uid and removes its IPC objects, unless the state's process was
reaped from namespaces of its own (then the kernel has ended all of it already; its
files lived in its own tmpfs).

:func:`sandbox_spec` turns a lease into the plain dict that the child applies with
:func:`agent.runtime.sandbox.enter_sandbox`.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from .._filelock import try_lock, unlock
from .._loops import grant_soon
from ..errors import IsolationUnavailableError
from ..runtime.sandbox import DEFAULT_HOME, DEFAULT_SHM_MB, ENV_KEEP
from .uid_sweep import kill_uid, remove_ipc, sweep_uid

UIDS_ENV = "AGENT_SANDBOX_UIDS"
LOCK_DIR_ENV = "AGENT_SANDBOX_LOCK_DIR"
TMP_MB_ENV = "AGENT_SANDBOX_TMP_MB"
FILE_MB_ENV = "AGENT_SANDBOX_FILE_MB"
DEFAULT_UIDS = range(200000, 201000)
DEFAULT_LOCK_DIR = "/run/agent-sandbox"

DEFAULT_NOFILE = 256
DEFAULT_NPROC = 128
DEFAULT_TMP_MB = 256
"""Size of a sandbox's private /tmp (a tmpfs whose pages count against its memory limit)."""
DEFAULT_FILE_MB = 128
"""RLIMIT_FSIZE of a sandbox: its largest file, and the cap on its attempt's log."""


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


_MB_MOST = (1 << 43) - 1  # MiB whose bytes a signed 64-bit limit still holds


def _env_mb(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value <= _MB_MOST:
        raise IsolationUnavailableError(f"{name}={text!r} must be a whole number of MiB from 1 to {_MB_MOST}")
    return value


def unavailable_reason() -> str | None:
    """Why sandboxes cannot be made by this process, or None when they can."""
    if os.geteuid() != 0:
        return (
            "sandbox isolation needs root (to switch uid and create namespaces); "
            "run the supervisor as root, e.g. under agentd, or use isolation='process'"
        )
    return None


@dataclass(frozen=True)
class SandboxLease:
    """One uid handed to one owner (a state attempt)."""

    owner: str
    uid: int
    gid: int

    def spec(self, **options: Any) -> dict[str, Any]:
        return sandbox_spec(self.uid, gid=self.gid, **options)


def sandbox_spec(
    uid: int,
    *,
    gid: int | None = None,
    nofile: int = DEFAULT_NOFILE,
    nproc: int = DEFAULT_NPROC,
    file_mb: int | None = None,
    tmp_mb: int | None = None,
    devices: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Plain data for :func:`agent.runtime.sandbox.enter_sandbox` (crosses the fork as is).

    ``devices`` are the device nodes (GPUs) the state gets besides the basic ones.
    """
    file_mb = file_mb if file_mb is not None else _env_mb(FILE_MB_ENV, DEFAULT_FILE_MB)
    return {
        "uid": uid,
        "gid": uid if gid is None else gid,
        "home": DEFAULT_HOME,
        "network": False,
        "filesystem": True,
        "seccomp": True,
        "tmp_mb": tmp_mb if tmp_mb is not None else _env_mb(TMP_MB_ENV, DEFAULT_TMP_MB),
        "shm_mb": DEFAULT_SHM_MB,
        "devices": list(devices),
        "rlimits": {"nofile": nofile, "nproc": nproc, "core": 0, "fsize": file_mb * 1024 * 1024},
        "env_keep": list(ENV_KEEP),
    }


@dataclass(frozen=True)
class UidPoolStatistics:
    total: int
    leased: int
    swept_after_crash: int


class UidsInUseError(IsolationUnavailableError):
    """Every uid of the range is leased: a launch waits for one (:meth:`UidPool.until_one_is_freed`)."""


def users_in(uids: range) -> list[str]:
    """The accounts of this machine whose uid is in ``uids`` (``name(uid)``)."""
    return sorted(f"{p.pw_name}({p.pw_uid})" for p in pwd.getpwall() if p.pw_uid in uids)


class UidPool:
    """Leases sandbox uids, one per owner; thread-safe and safe across processes.

    A range that holds an account of this machine is refused: a sandbox would run as that
    user, and the sweep of a uid left by a crash kills that user's processes and removes
    their files in /tmp.
    """

    def __init__(self, uids: range | None = None, *, lock_dir: str | None = None) -> None:
        self.uids = uids if uids is not None else configured_uids()
        if len(self.uids) == 0 or self.uids.start <= 0:
            raise IsolationUnavailableError(f"sandbox uid range {self.uids} is empty or includes root")
        taken = users_in(self.uids)
        if taken:
            raise IsolationUnavailableError(
                f"sandbox uids {self.uids.start}-{self.uids.stop - 1} include users {', '.join(taken)}: a "
                f"sandbox would run as them; choose a range no account uses with {UIDS_ENV}=lo-hi"
            )
        self.lock_dir = lock_dir or os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR
        self._mutex = threading.Lock()
        self._leases: dict[str, tuple[SandboxLease, int]] = {}
        self._ahead: list[str] = []  # owners of leases taken ahead, oldest first
        self._cursor = 0
        self._reaped = False
        self._swept_after_crash = 0
        self._freed: list[asyncio.Future[None]] = []  # until_one_is_freed()

    def lease(self, owner: str, *, ahead: bool = False) -> SandboxLease:
        """A uid nobody else holds, with nothing of a previous tenant; raises when all are taken.

        ``ahead``: for a launch still to come, which :meth:`claim` turns into its own; until then
        a lease that finds every uid taken takes it over.
        """
        with self._mutex:
            if owner in self._leases:
                raise IsolationUnavailableError(f"{owner!r} already holds sandbox uid {self._leases[owner][0].uid}")
            self._prepare_lock_dir()
            if not self._reaped:
                self._reap_crashed()
            mine = {lease.uid for lease, _ in self._leases.values()}
            count = len(self.uids)
            for step in range(count):
                position = (self._cursor + step) % count
                uid = self.uids[position]
                if uid in mine:
                    continue
                locked = self._try_lock(uid)
                if locked is not None:
                    self._cursor = position + 1
                    break
            else:
                if self._ahead and not ahead:
                    return self._take_over(self._ahead[0], owner)
                raise UidsInUseError(
                    f"all {count} sandbox uids ({self.uids.start}-{self.uids.stop - 1}) are in use; "
                    f"widen the range with {UIDS_ENV}=lo-hi"
                )
            fd, left_by_crash = locked
            try:
                if left_by_crash:
                    sweep_uid(uid)
                    self._swept_after_crash += 1
                os.ftruncate(fd, 0)
                os.write(fd, f"leased by pid {os.getpid()} for {owner} at {time.time():.3f}\n".encode())
            except BaseException:
                os.close(fd)  # the file stays: the next lease sweeps the uid in full
                raise
            lease = SandboxLease(owner=owner, uid=uid, gid=uid)
            self._leases[owner] = (lease, fd)
            if ahead:
                self._ahead.append(owner)
            return lease

    def claim(self, ahead: SandboxLease, owner: str) -> SandboxLease:
        """The uid leased ``ahead`` as ``owner``'s, or another one if a lease took it over."""
        with self._mutex:
            if ahead.owner in self._ahead and owner not in self._leases:
                return self._take_over(ahead.owner, owner)
        return self.lease(owner)  # (which refuses an owner that holds one already)

    def _take_over(self, ahead_owner: str, owner: str) -> SandboxLease:  # holding the mutex
        self._ahead.remove(ahead_owner)
        held, fd = self._leases.pop(ahead_owner)
        lease = SandboxLease(owner=owner, uid=held.uid, gid=held.gid)
        self._leases[owner] = (lease, fd)
        return lease

    def release(self, owner: str, *, contained: bool = False) -> None:
        """Kill what still runs as the owner's uid, remove its IPC objects, free the uid (idempotent).

        ``contained``: the uid's only process was PID 1 of its own PID and IPC namespaces
        and has been reaped, so the kernel has already ended everything of it: no sweep.
        """
        with self._mutex:
            held = self._leases.pop(owner, None)
            if held is None:
                return
            if owner in self._ahead:
                self._ahead.remove(owner)
            lease, fd = held
            try:
                if not contained:
                    kill_uid(lease.uid)
                    remove_ipc(lease.uid)
            except BaseException:
                os.close(fd)  # keep the file: the uid is swept in full before its next lease
                raise
            self._unlock(lease.uid, fd)
            freed, self._freed = self._freed, []
        for future in freed:
            grant_soon(future)

    def until_one_is_freed(self) -> asyncio.Future[None]:
        """A future of this loop, set when this pool next frees a uid (another process's
        leases are not seen: wait on it with a timeout, and ask again)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._mutex:
            self._freed = [f for f in self._freed if not f.done()]  # (those that gave up waiting)
            self._freed.append(future)
        return future

    def leased(self) -> dict[str, int]:
        """owner -> uid for every lease held by this pool."""
        with self._mutex:
            return {owner: lease.uid for owner, (lease, _) in self._leases.items()}

    def statistics(self) -> UidPoolStatistics:
        with self._mutex:
            return UidPoolStatistics(total=len(self.uids), leased=len(self._leases),
                                     swept_after_crash=self._swept_after_crash)

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

    def _reap_crashed(self) -> None:
        """Sweep every uid of the range whose lease file outlived its holder, once per pool."""
        self._reaped = True
        for path in glob.glob(os.path.join(self.lock_dir, "*.lock")):
            try:
                uid = int(os.path.basename(path)[: -len(".lock")])
            except ValueError:
                continue
            if uid not in self.uids:
                continue
            locked = self._try_lock(uid)
            if locked is None:
                continue  # leased right now by another supervisor
            fd, left_by_crash = locked
            if left_by_crash:
                sweep_uid(uid)
                self._swept_after_crash += 1
            self._unlock(uid, fd)
        # Private temporary directories of earlier versions, whose uid nobody leases.
        for path in glob.glob(os.path.join(tempfile.gettempdir(), "agent-sandbox-*-*")):
            try:
                uid = int(os.path.basename(path).split("-")[2])
            except (ValueError, IndexError):
                continue
            if uid in self.uids and not os.path.exists(self._lock_path(uid)):
                sweep_uid(uid)

    def _lock_path(self, uid: int) -> str:
        return os.path.join(self.lock_dir, f"{uid}.lock")

    def _try_lock(self, uid: int) -> tuple[int, bool] | None:
        """(descriptor, whether a crashed holder left the file) once locked; None when taken."""
        return try_lock(self._lock_path(uid))

    def _unlock(self, uid: int, fd: int) -> None:
        unlock(self._lock_path(uid), fd)
