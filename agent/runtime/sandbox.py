"""Child side of the ``sandbox`` isolation level: become an unprivileged, contained process.

The bar is systemd's hardening (``DynamicUser``, ``PrivateTmp``, ``PrivateIPC``,
``PrivateDevices``, ``ProtectSystem=strict``, ``ProtectProc=invisible``,
``NoNewPrivileges``, ``RestrictNamespaces``, ``SystemCallFilter``, ``LimitFSIZE``,
``KeyringMode=private``), reached at fork speed. The zygote forks a sandboxed child as
PID 1 of a new PID namespace; the child then, in two steps:

1. :func:`leave_namespaces`, once it is connected to the supervisor: new network, mount
   and IPC namespaces (namespaces belong to threads, so every thread must be inside:
   checked). A connected unix socket keeps working across them. Then
   :func:`wipe_environment`: the state's modules load seeing only the sandbox's variables.
2. :func:`enter_sandbox`, once the state function and its modules are loaded (so code
   under a private directory still loads): a read-only, ``nosuid`` view of the whole
   filesystem with a private size-limited ``/tmp`` (also ``/var/tmp``), a minimal
   ``/dev`` (null, zero, full, random, urandom, tty and the GPUs it was given), an empty
   ``/dev/shm`` and ``/dev/mqueue``, and a ``/proc`` that shows only its own processes;
   its own session, resource limits, a fresh session keyring, the sandbox uid and gid (no
   way back), no new privileges, not dumpable, the supervisor's environment wiped from
   memory, and last the seccomp filter (:mod:`agent.runtime.seccomp`).

A child parked for sandboxed launches does step 1 and the part of step 2 that no attempt
changes (the read-only view, /dev, /dev/shm, /dev/mqueue: :func:`make_view_ahead`) while it
waits; at launch only the private /tmp and /proc remain, after the state's code is loaded
(and the variables its launch set are wiped again).

Being PID 1 of its namespace, the state's process takes every process it leaves behind
with it when it ends, and signals it sends to itself are ignored unless it handles them
(as for any container's init). Everything here is ``os``/``resource`` plus libc through
ctypes (``os.unshare`` is Python 3.12+). Each step raises ``OSError`` when it fails; the
child must then exit without running user code.
"""

from __future__ import annotations

import ctypes
import os
import resource
import socket
import stat
import sys
from typing import Any

from . import seccomp

CLONE_NEWNS = seccomp.CLONE_NEWNS
CLONE_NEWIPC = seccomp.CLONE_NEWIPC
CLONE_NEWNET = seccomp.CLONE_NEWNET
CLONE_NEWPID = seccomp.CLONE_NEWPID
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture
KEYCTL_JOIN_SESSION_KEYRING = 1
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

# Device nodes every sandbox gets (bound from the machine's /dev), then its GPUs.
BASIC_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEFAULT_TMP_MB = 256
DEFAULT_SHM_MB = 64
DEFAULT_HOME = "/nonexistent"
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
"""Variables a sandboxed state keeps; everything else of the supervisor's is dropped."""

_RLIMITS = {
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
    "fsize": resource.RLIMIT_FSIZE,
    "as": resource.RLIMIT_AS,
    "msgqueue": resource.RLIMIT_MSGQUEUE,
    "memlock": resource.RLIMIT_MEMLOCK,
}

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def _call(name: str, *args: int) -> int:
    func = getattr(_lib(), name)
    result = func(*(ctypes.c_long(a) for a in args))
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


def unshare(flags: int) -> None:
    """libc ``unshare(flags)``; raises OSError on failure."""
    _call("unshare", flags)


# --- namespaces -------------------------------------------------------------------------


def _ns(kind: str) -> int:
    return os.stat(f"/proc/thread-self/ns/{kind}").st_ino


# The network namespace this process left, so a second call does nothing.
_left_netns: int | None = None


def isolate_network() -> None:
    """Move the calling thread into a new network namespace: no interfaces but a down loopback.

    Idempotent: once this process has left its original namespace it stays out.
    """
    global _left_netns
    if _left_netns is not None and _ns("net") != _left_netns:
        return
    before = _ns("net")
    unshare(CLONE_NEWNET)
    _left_netns = before


def _threads_in_other_netns() -> list[int]:
    own = _ns("net")
    others = []
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.stat(f"/proc/self/task/{tid}/ns/net").st_ino != own:
                others.append(int(tid))
        except FileNotFoundError:  # the thread just ended
            continue
    return others


# The mount namespace of this process when it left its parent's (None: not yet).
_own_mntns: int | None = None


def leave_namespaces(spec: dict[str, Any], made: list[int] | None = None) -> None:
    """New network (unless the spec allows it), mount and IPC namespaces; idempotent.

    ``made`` are descriptors of fresh network and IPC namespaces made ahead (by the
    zygote) to enter instead of making them here; they are closed.
    """
    global _own_mntns, _left_netns
    if made:
        net, ipc = made
        try:
            if not spec.get("network", False):
                before = _ns("net")
                _setns(net, CLONE_NEWNET)
                _left_netns = before
            _setns(ipc, CLONE_NEWIPC)
        finally:
            os.close(net)
            os.close(ipc)
    elif not spec.get("network", False):
        isolate_network()
    if not spec.get("network", False):
        stray = _threads_in_other_netns()
        if stray:
            raise OSError(
                1,
                f"threads {stray} are outside the sandbox's network namespace: call "
                "isolate_network() before starting threads",
            )
    if _own_mntns is None or _ns("mnt") != _own_mntns:
        unshare(CLONE_NEWNS | (0 if made else CLONE_NEWIPC))
        _own_mntns = _ns("mnt")


def _setns(fd: int, nstype: int) -> None:
    if _lib().setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({nstype:#x}): {os.strerror(err)}")


# --- the filesystem -----------------------------------------------------------------------


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    mount = _lib().mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    if mount(encode(source), encode(target), encode(fstype), flags, encode(data)) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _read_only_everywhere() -> None:
    """Every mount of this namespace read-only and ``nosuid``.

    One ``mount_setattr(AT_RECURSIVE)`` (Linux 5.12+), else a bind remount of each mount
    point listed in mountinfo, keeping its other flags (what bubblewrap does).
    """
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    result = _lib().syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), b"/",
                            ctypes.c_long(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr)))
    if result == 0:
        return
    err = ctypes.get_errno()
    if err not in (38, 22):  # ENOSYS, EINVAL: an older kernel
        raise OSError(err, f"mount_setattr(/, read-only, recursive): {os.strerror(err)}")
    for target, flags in _mount_points():
        try:
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | flags)
        except OSError as exc:
            if exc.errno != 13:  # EACCES: a mount point root cannot reach, so no one can
                raise


_OPTION_FLAGS = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) for each line of /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
            flags = 0
            for option in fields[5].split(","):
                flags |= _OPTION_FLAGS.get(option, 0)
            points.append((target, flags))
    return points


def _private_dev(devices: list[str]) -> None:
    """A fresh /dev holding only the basic devices and ``devices`` (paths under /dev).

    Each node is made anew (``mknod`` with the machine's numbers and mode), not bound:
    a bind mount per node costs as much to make and again to tear down when the state
    ends. The devices cgroup still decides which of them may be opened.
    """
    keep = [f"/dev/{name}" for name in BASIC_DEVICES] + [d for d in devices if d.startswith("/dev/")]
    nodes = []
    for path in keep:
        try:
            info = os.stat(path)
        except OSError:
            continue  # not on this machine
        if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
            nodes.append((path, info))
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=256,mode=755")
    old_umask = os.umask(0)
    try:
        for path, info in nodes:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            os.mknod(path, info.st_mode, info.st_rdev)
            if (info.st_uid, info.st_gid) != (0, 0):
                os.chown(path, info.st_uid, info.st_gid)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"/dev/{name}")
        for name in ("shm", "mqueue"):
            os.mkdir(f"/dev/{name}", 0o755)
    finally:
        os.umask(old_umask)


def isolate_filesystem(spec: dict[str, Any]) -> None:
    """The sandbox's view of the filesystem (in its own mount namespace, see the module)."""
    _shared_view(spec)
    _private_tmp_and_proc(spec)


def _shared_view(spec: dict[str, Any]) -> None:
    """What every sandbox of the same view (:func:`view_of`) gets: a read-only filesystem
    with a private /dev, /dev/shm and /dev/mqueue."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates in or out
    _private_dev(list(spec.get("devices", ())))
    _read_only_everywhere()
    writable = MS_NOSUID | MS_NODEV
    _mount("tmpfs", "/dev/shm", "tmpfs", writable | MS_NOEXEC,
           f"size={int(spec.get('shm_mb', DEFAULT_SHM_MB))}m,nr_inodes=4096,mode=1777")
    _mount("mqueue", "/dev/mqueue", "mqueue", writable | MS_NOEXEC)


def _private_tmp_and_proc(spec: dict[str, Any]) -> None:
    """A private, size-limited /tmp (and /var/tmp), and a /proc of this PID namespace only.

    Last, because until then the supervisor's log pipe (opened through its /proc) and
    code under /tmp are still reachable."""
    tmp_mb = int(spec.get("tmp_mb", DEFAULT_TMP_MB))
    writable = MS_NOSUID | MS_NODEV
    _mount("tmpfs", "/tmp", "tmpfs", writable, f"size={tmp_mb}m,nr_inodes={max(1024, tmp_mb * 64)},mode=1777")
    if os.path.isdir("/var/tmp"):
        _mount("/tmp", "/var/tmp", None, MS_BIND)
    _mount("proc", "/proc", "proc", writable | MS_NOEXEC)  # this PID namespace's processes


def view_of(spec: dict[str, Any]) -> tuple[Any, ...]:
    """What of a sandbox spec :func:`make_view_ahead` depends on: two specs with the same view
    may be served by a process prepared for either."""
    return (bool(spec.get("network", False)), bool(spec.get("filesystem", True)),
            int(spec.get("shm_mb", DEFAULT_SHM_MB)), tuple(spec.get("devices", ())))


DEFAULT_VIEW: dict[str, Any] = {"network": False, "filesystem": True, "shm_mb": DEFAULT_SHM_MB, "devices": [],
                                 "env_keep": list(ENV_KEEP), "home": DEFAULT_HOME}
"""The view of a sandbox without GPUs (what :func:`agent.supervisor.sandbox.sandbox_spec`
builds): the one parked children prepare ahead."""

_view_ahead: tuple[Any, ...] | None = None  # view_of() of what make_view_ahead made


def make_view_ahead(spec: dict[str, Any], made: list[int] | None = None) -> None:
    """Do now the part of :func:`enter_sandbox` that depends only on ``view_of(spec)``: new
    namespaces and the read-only view of the filesystem (a parked child, before any
    attempt is known), and the supervisor's environment wiped (what the state's modules
    read as they load is then what the state will see). :func:`enter_sandbox` then does
    only the rest, and refuses a spec of another view."""
    global _view_ahead
    leave_namespaces(spec, made)
    if spec.get("filesystem", True):
        _shared_view(spec)
    wipe_environment(spec)
    _view_ahead = view_of(spec)


def view_made_ahead() -> bool:
    return _view_ahead is not None


# --- identity and the rest ------------------------------------------------------------------


def _limit(name: str, value: int) -> None:
    which = _RLIMITS[name]
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def join_new_session_keyring() -> None:
    """Subscribe to a new, empty session keyring: none of the supervisor's keys are reachable."""
    nr = {"x86_64": 250, "aarch64": 219}.get(seccomp.machine())
    if nr is None:
        raise OSError(38, f"no keyctl syscall number for {seccomp.machine()}")
    if _lib().syscall(ctypes.c_long(nr), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)}")


def wipe_environment(spec: dict[str, Any]) -> None:
    """Only the variables the sandbox keeps (``env_keep``) and sets (its home, its private
    /tmp as TMPDIR) stay; the supervisor's others are gone, from memory too, and so are
    the zygote's arguments past the program name. Idempotent."""
    env = {"HOME": str(spec.get("home", DEFAULT_HOME))}
    if spec.get("filesystem", True):
        env["TMPDIR"] = "/tmp"
    _scrub_environment(list(spec.get("env_keep", ())), env)
    _scrub_arguments()


_environ_block_wiped = False
_argument_block_wiped = False


_ZYGOTE_MODULE = "agent.runtime.zygote"


def _own_stat() -> list[bytes]:
    """The fields of ``/proc/self/stat`` after the command name (field 3 of proc(5) first)."""
    fd = os.open("/proc/self/stat", os.O_RDONLY)
    try:
        return os.read(fd, 4096).rsplit(b")", 1)[1].split()
    finally:
        os.close(fd)


def _scrub_arguments() -> None:
    """Zero the zygote's arguments past its module's name (``/proc/self/cmdline``: the
    supervisor's pid, its socket and log directories, its cgroups), and drop them from
    ``sys.orig_argv``; ``ps`` still shows a process of the zygote."""
    global _argument_block_wiped
    if _ZYGOTE_MODULE in sys.orig_argv:
        del sys.orig_argv[sys.orig_argv.index(_ZYGOTE_MODULE) + 1:]
    else:
        del sys.orig_argv[1:]
    if _argument_block_wiped:
        return
    fields = _own_stat()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49 of proc(5)
    if 0 < start < end:
        kept = len(b"\0".join(os.fsencode(arg) for arg in sys.orig_argv)) + 1
        if start + kept < end:
            ctypes.memset(start + kept, 0, end - start - kept)
    _argument_block_wiped = True


def _scrub_environment(keep: list[str], set_: dict[str, str]) -> None:
    """Only ``keep`` and ``set_`` stay; the rest is unset and overwritten in memory.

    The environment the zygote started with is in every child's memory twice: the
    initial block on the stack (``/proc/self/environ``) and the bytes objects of
    ``os.environ``. Both are zeroed, so the sandbox cannot read the supervisor's
    variables out of its own memory.
    """
    import posix

    kept = {k: os.environ[k] for k in keep if k in os.environ}
    for value in posix.environ.values():
        if len(value) > 1:  # one-byte bytes objects are shared singletons
            ctypes.memset(value, 0, len(value))
    _lib().clearenv()  # the C library's environ: what child processes inherit
    posix.environ.clear()  # os.environ's own mapping
    global _environ_block_wiped
    if not _environ_block_wiped:
        fields = _own_stat()
        env_start, env_end = int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5)
        if 0 < env_start < env_end:
            ctypes.memset(env_start, 0, env_end - env_start)
        _environ_block_wiped = True
    os.environ.update(kept)
    os.environ.update(set_)


def enter_sandbox(spec: dict[str, Any], notify: socket.socket | None = None) -> None:
    """Become the sandbox described by ``spec`` (built by the supervisor's ``sandbox_spec``).

    ``notify`` is a datagram socket to the zygote: the seccomp listener is sent over it,
    so that the zygote answers denied calls and names them. Without it the filter
    answers EPERM itself. The sandbox's mount namespace goes with it (message ``M``,
    ``L`` for the listener, descriptors in that order): the zygote holds it until it has
    reported this process's exit, so that unmounting the sandbox's file systems (a few
    hundred microseconds of kernel work per mount) is not part of the exit the
    supervisor waits for. The order matters: namespaces and mounts need root; the
    uid switch clears the parent-death signal (restored); the filter comes last because
    it forbids mounts and keyrings.
    """
    uid = int(spec["uid"])
    gid = int(spec.get("gid", uid))
    if uid == 0 or gid == 0:
        raise OSError(1, "a sandbox must not run as root (uid/gid 0)")
    if os.getsid(0) != os.getpid():
        os.setsid()  # its own session and process group, no controlling terminal
    if _view_ahead is None:
        leave_namespaces(spec)
        if spec.get("filesystem", True):
            isolate_filesystem(spec)
    elif _view_ahead != view_of(spec):
        raise OSError(1, f"this process was prepared for a sandbox view {_view_ahead}, not {view_of(spec)}")
    elif spec.get("filesystem", True):
        _private_tmp_and_proc(spec)
    handed = [os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)] if notify is not None else []
    for name, value in dict(spec.get("rlimits", {})).items():
        _limit(name, int(value))
    join_new_session_keyring()

    pdeathsig = get_pdeathsig()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)
    if pdeathsig:
        prctl(PR_SET_PDEATHSIG, pdeathsig)

    wipe_environment(spec)
    os.chdir("/tmp" if spec.get("filesystem", True) else "/")
    os.umask(0o077)
    if spec.get("seccomp", True):
        listener = seccomp.install(listener=notify is not None)
        if listener is not None:
            handed.append(listener)
    if notify is not None:
        try:
            socket.send_fds(notify, [b"ML"[: len(handed)]], handed)
        finally:
            for fd in handed:
                os.close(fd)
            notify.close()
