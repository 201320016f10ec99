"""Child side of the ``sandbox`` isolation level: drop into an unprivileged, offline process.

Two steps, because they have to happen at different moments of a child's life:

1. :func:`isolate_network` right after fork, before any thread exists (a thread started
   earlier would stay in the machine's network namespace: namespaces belong to threads). A unix socket path (``ipc://``)
   still works from the new namespace; abstract unix sockets and TCP do not.
2. :func:`enter_sandbox` after the child has connected to the supervisor, said hello and
   loaded the state function and its modules, so code under a private directory (a
   0700 home) still loads. The IPC connection is already established at that point and
   keeps working after the uid changes; the IPC directory stays 0700 root, so the
   sandbox can never open a new connection to it (nor to any other child's socket).

Everything here is plain ``os``/``resource`` plus ``prctl``/``unshare`` from libc via
ctypes (``os.unshare`` is Python 3.12+). Each step raises ``OSError`` when it fails;
the child must then exit without running user code.
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

_RLIMITS = {
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
    "fsize": resource.RLIMIT_FSIZE,
    "as": resource.RLIMIT_AS,
}

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _call(name: str, *args: int) -> int:
    func = getattr(_lib(), name)
    result = func(*(ctypes.c_ulong(a) for a in args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args}: {os.strerror(err)}")
    return int(result)


def prctl(option: int, arg2: int = 0) -> int:
    """libc ``prctl(option, arg2, 0, 0, 0)``; raises OSError on failure."""
    return _call("prctl", option, arg2, 0, 0, 0)


def get_pdeathsig() -> int:
    """The signal this process receives when its parent dies (0 for none)."""
    sig = ctypes.c_int(0)
    if _lib().prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_GET_PDEATHSIG): {os.strerror(err)}")
    return sig.value


# The namespace this process left, so a second call (from enter_sandbox) does nothing.
_left_netns: int | None = None


def _netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def isolate_network() -> None:
    """Move the calling thread into a new network namespace: no interfaces but a down loopback.

    Idempotent: once this process has left its original namespace it stays out.
    """
    global _left_netns
    if _left_netns is not None and _netns() != _left_netns:
        return
    before = _netns()
    _call("unshare", CLONE_NEWNET)
    _left_netns = before


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    mount = _lib().mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    if mount(encode(source), encode(target), encode(fstype), flags, encode(data)) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def private_tmp(tmpdir: str, shm_size_mb: int = 64) -> None:
    """Give this process its own ``/tmp`` and ``/var/tmp`` (``tmpdir`` bound over both) and an empty ``/dev/shm``.

    A new mount namespace whose mounts never propagate back to the machine, so what a
    state leaves in /tmp is in its own directory (removed by the supervisor), and it
    sees nothing of other states' or the machine's temporary files.
    """
    _call("unshare", CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_SLAVE)
    # Bind through a descriptor: the first bind may hide tmpdir's own path (it lives in /tmp).
    fd = os.open(tmpdir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for shared in ("/tmp", "/var/tmp"):
            if os.path.isdir(shared):
                _mount(f"/proc/self/fd/{fd}", shared, None, MS_BIND)
    finally:
        os.close(fd)
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={shm_size_mb}m,mode=1777")


def _threads_in_other_netns() -> list[int]:
    own = os.stat("/proc/thread-self/ns/net").st_ino
    others = []
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.stat(f"/proc/self/task/{tid}/ns/net").st_ino != own:
                others.append(int(tid))
        except FileNotFoundError:  # the thread just ended
            continue
    return others


def _limit(name: str, value: int) -> None:
    which = _RLIMITS[name]
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _scrub_environment(keep: list[str], set_: dict[str, str]) -> None:
    kept = {k: os.environ[k] for k in keep if k in os.environ}
    os.environ.clear()  # unsetenv()s every variable, so child processes inherit none
    # posix.environ is the interpreter's own startup copy, separate from os.environ.
    import posix

    posix.environ.clear()
    os.environ.update(kept)
    os.environ.update(set_)


def enter_sandbox(spec: dict[str, Any]) -> None:
    """Become the sandbox described by ``spec`` (built by the supervisor's ``sandbox_spec``).

    In order: private network namespace (unless already entered, and every thread must be
    in it), a private /tmp and /dev/shm (when the spec has a ``tmpdir``), resource limits, no supplementary groups, the sandbox gid and uid (real,
    effective and saved: there is no way back), no new privileges, not dumpable (no
    ptrace, no core, /proc entries owned by root), the parent-death signal restored (a
    credential change clears it), a scrubbed environment, cwd and umask.
    """
    uid = int(spec["uid"])
    gid = int(spec.get("gid", uid))
    if uid == 0 or gid == 0:
        raise OSError(1, "a sandbox must not run as root (uid/gid 0)")

    if not spec.get("network", False):
        isolate_network()
        stray = _threads_in_other_netns()
        if stray:
            raise OSError(
                1,
                f"threads {stray} are outside the sandbox's network namespace: call "
                "isolate_network() before starting threads",
            )

    tmpdir = spec.get("tmpdir")
    if tmpdir and spec.get("private_tmp", True):
        private_tmp(str(tmpdir))
        tmpdir = "/tmp"

    for name, value in dict(spec.get("rlimits", {})).items():
        _limit(name, int(value))

    pdeathsig = get_pdeathsig()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)
    if pdeathsig:
        prctl(PR_SET_PDEATHSIG, pdeathsig)

    env_set = {"HOME": str(spec.get("home", "/nonexistent"))}
    if tmpdir:
        env_set["TMPDIR"] = str(tmpdir)
    _scrub_environment(list(spec.get("env_keep", [])), env_set)
    os.chdir(str(tmpdir or "/"))
    os.umask(0o077)
