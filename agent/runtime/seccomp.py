"""The sandbox's system-call filter: a small classic-BPF program installed with seccomp(2).

Why our own BPF and not libseccomp: Debian's ``python3-seccomp`` is built for
``/usr/bin/python3`` only and cannot be imported from a virtual environment; ``pyseccomp``
(ctypes over libseccomp) has had no release since 2021 and cannot ask for a notification
listener; and the filter needed is a deny-list of about fifty calls with two argument
checks, some forty instructions. Written here it needs no native library, installs in
microseconds, and is checked instruction by instruction in ``tests/sandbox``.

What it does, for x86_64 and aarch64 (other architectures: :func:`supported` is False and
the sandbox reports seccomp as unavailable):

* a call made through another ABI (i386 ``int 0x80``, x32) kills the process: its numbers
  differ and would slip past the list;
* ``clone3`` fails with ENOSYS (its flags live in memory a filter cannot read; the C
  library then falls back to ``clone``, whose flags it can);
* ``socket`` of a family no network namespace covers (:data:`UNNAMESPACED_FAMILIES`:
  vsock, which reaches the virtual machine's host) fails with EAFNOSUPPORT, as where the
  kernel lacks it;
* ``clone`` and ``unshare`` with any namespace flag, and every call in :data:`DENIED`
  and :data:`QUIET` (namespaces, mounts, keyrings, ptrace and cross-process memory, bpf,
  perf, io_uring, kexec, modules, userfaultfd, ...) fail with EPERM, as does
  ``personality`` other than a query;
* everything else is allowed.

A denied call is handed to a *listener* (``SECCOMP_RET_USER_NOTIF``) when the kernel has
one: the zygote answers EPERM and tells the supervisor which call it was, so that a state
that dies of it gets a reason naming the call. Without a listener the filter answers
EPERM itself, as it does for :data:`QUIET` calls. io_uring is refused because its
operations run outside the filter's sight (and it is a large kernel surface); a
sandboxed state therefore runs on asyncio's own event loop, since uvloop's libuv opens
an io_uring for every loop (a loop made inside the sandbox just goes without one). Calls
added to the kernel after this table was written are allowed: the
table is a deny-list, like Docker's default profile's complement.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import platform
import struct

# Namespace flags of clone/unshare (CLONE_NEWTIME shares its bit with CSIGNAL in clone,
# where no exit signal number ever sets it).
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWTIME | CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC
    | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)

# Calls that fail with EPERM whatever their arguments.
DENIED = (
    "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "keyctl", "add_key", "request_key",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "process_madvise",
    "bpf", "perf_event_open", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "userfaultfd", "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "quotactl_fd",
    "lookup_dcookie", "name_to_handle_at", "open_by_handle_at", "fanotify_init", "vhangup",
)
# Denied calls that libraries probe as a matter of course (libuv tries io_uring for each
# event loop): refused with EPERM by the filter itself, never reported as a denial.
QUIET = ("io_uring_setup",)
# Calls denied only with namespace flags (argument 0), and personality other than a query.
FLAG_CHECKED = ("clone", "unshare")
PERSONALITY_QUERY = 0xFFFFFFFF
# Socket families (argument 0 of socket) that a network namespace does not confine.
AF_VSOCK = 40
UNNAMESPACED_FAMILIES = (AF_VSOCK,)

_X86_64 = {
    "socket": 41, "clone": 56, "ptrace": 101, "syslog": 103, "personality": 135, "vhangup": 153,
    "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "seccomp": 317, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
    "quotactl_fd": 443,
}
_AARCH64 = {
    "lookup_dcookie": 18, "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51,
    "vhangup": 58, "quotactl": 60, "acct": 89, "personality": 92, "unshare": 97, "kexec_load": 104,
    "init_module": 105, "delete_module": 106, "syslog": 116, "ptrace": 117, "reboot": 142,
    "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225,
    "socket": 198, "perf_event_open": 241, "fanotify_init": 262, "name_to_handle_at": 264,
    "open_by_handle_at": 265, "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271,
    "finit_module": 273, "seccomp": 277, "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
    "quotactl_fd": 443,
}
# machine -> (AUDIT_ARCH_*, syscall numbers, bit that marks a foreign ABI's numbers or 0)
ARCHES = {
    "x86_64": (0xC000003E, _X86_64, 0x40000000),
    "aarch64": (0xC00000B7, _AARCH64, 0),
}

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4
RET_KILL_PROCESS = 0x80000000
RET_USER_NOTIF = 0x7FC00000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
PR_SET_NO_NEW_PRIVS = 38

# ioctls of the listener (struct seccomp_notif: 80 bytes; seccomp_notif_resp: 24)
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, ip, args
_NOTIF_RESP = struct.Struct("=QqiI")  # id, val, error, flags

# classic BPF opcodes
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LOW = 0, 4, 16  # offsets in struct seccomp_data (little endian)


def machine() -> str:
    return platform.machine()


def supported() -> bool:
    """Whether this architecture has a syscall table here."""
    return machine() in ARCHES


def syscall_name(nr: int, arch: str | None = None) -> str:
    """The name of syscall ``nr`` if it is one the filter knows, else ``syscall <nr>``."""
    table = ARCHES.get(arch or machine(), (0, {}, 0))[1]
    for name, number in table.items():
        if number == nr:
            return name
    return f"syscall {nr}"


def build(deny_action: int = RET_ERRNO | errno.EPERM, arch: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as ``(code, jt, jf, k)`` instructions; denied calls return ``deny_action``."""
    audit_arch, table, foreign_bit = ARCHES[arch or machine()]
    # (opcode, label-if-true, label-if-false, k): labels resolve to relative jumps.
    program: list[tuple[int, str | None, str | None, int]] = [
        (_LD_ABS, None, None, _OFF_ARCH),
        (_JEQ, None, "kill", audit_arch),
        (_LD_ABS, None, None, _OFF_NR),
    ]
    if foreign_bit:
        program.append((_JGE, "kill", None, foreign_bit))
    program.append((_JEQ, "enosys", None, table["clone3"]))
    for name in QUIET:
        program.append((_JEQ, "eperm", None, table[name]))
    for name in DENIED:
        program.append((_JEQ, "deny", None, table[name]))
    for name in FLAG_CHECKED:
        program.append((_JEQ, "flags", None, table[name]))
    program.append((_JEQ, "personality", None, table["personality"]))
    program.append((_JEQ, "family", None, table["socket"]))
    program += [
        (_RET, None, None, RET_ALLOW),
        ("family", None, None, 0),  # type: ignore[list-item]
        (_LD_ABS, None, None, _OFF_ARG0_LOW),
        *[(_JEQ, "eafnosupport", None, family) for family in UNNAMESPACED_FAMILIES],
        (_RET, None, None, RET_ALLOW),
        ("eafnosupport", None, None, 0),  # type: ignore[list-item]
        (_RET, None, None, RET_ERRNO | errno.EAFNOSUPPORT),
        ("flags", None, None, 0),  # type: ignore[list-item]
        (_LD_ABS, None, None, _OFF_ARG0_LOW),
        (_JSET, "deny", None, NAMESPACE_FLAGS),
        (_RET, None, None, RET_ALLOW),
        ("personality", None, None, 0),  # type: ignore[list-item]
        (_LD_ABS, None, None, _OFF_ARG0_LOW),
        (_JEQ, "allow", None, PERSONALITY_QUERY),
        (_JEQ, "allow", "deny", 0),
        ("allow", None, None, 0),  # type: ignore[list-item]
        (_RET, None, None, RET_ALLOW),
        ("deny", None, None, 0),  # type: ignore[list-item]
        (_RET, None, None, deny_action),
        ("eperm", None, None, 0),  # type: ignore[list-item]
        (_RET, None, None, RET_ERRNO | errno.EPERM),
        ("enosys", None, None, 0),  # type: ignore[list-item]
        (_RET, None, None, RET_ERRNO | errno.ENOSYS),
        ("kill", None, None, 0),  # type: ignore[list-item]
        (_RET, None, None, RET_KILL_PROCESS),
    ]
    return _assemble(program)


def _assemble(program: list[tuple]) -> list[tuple[int, int, int, int]]:
    labels: dict[str, int] = {}
    code: list[tuple] = []
    for ins in program:
        if isinstance(ins[0], str):
            labels[ins[0]] = len(code)
        else:
            code.append(ins)
    out = []
    for index, (op, if_true, if_false, k) in enumerate(code):
        jt = labels[if_true] - index - 1 if if_true else 0
        jf = labels[if_false] - index - 1 if if_false else 0
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise ValueError("seccomp filter: a jump is out of range")
        out.append((op, jt, jf, k))
    return out


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@functools.cache
def _compiled(deny_action: int) -> tuple[_SockFprog, ctypes.Array[_SockFilter]]:
    """The filter as the kernel takes it (built once, in the zygote, by :func:`prepare`)."""
    program = build(deny_action)
    filters = (_SockFilter * len(program))(*program)
    return _SockFprog(len(program), filters), filters


def prepare() -> None:
    """Build both variants of the filter now, so that forked children only install them."""
    if supported():
        _compiled(RET_USER_NOTIF)
        _compiled(RET_ERRNO | errno.EPERM)


def _seccomp(flags: int, deny_action: int) -> int:
    prog, _ = _compiled(deny_action)
    nr = ARCHES[machine()][1]["seccomp"]
    result = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                           ctypes.c_long(flags), ctypes.byref(prog))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")
    return int(result)


def install(*, listener: bool) -> int | None:
    """Install the filter on every thread of this process; no way back.

    With ``listener`` the denied calls wait for an answer on the returned descriptor
    (which the caller hands to the zygote); where the kernel cannot do that the filter
    answers EPERM itself and None is returned. ``no_new_privs`` must be set (it is, by
    the sandbox) unless the caller has CAP_SYS_ADMIN.
    """
    if not supported():
        raise OSError(errno.ENOSYS, f"no seccomp syscall table for {machine()}")
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    if listener:
        try:
            return _seccomp(
                SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_TSYNC_ESRCH,
                RET_USER_NOTIF,
            )
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    _seccomp(SECCOMP_FILTER_FLAG_TSYNC, RET_ERRNO | errno.EPERM)
    return None


def answer(listener: int) -> tuple[int, int] | None:
    """Answer one pending notification on ``listener`` with EPERM; returns (pid, nr).

    None when the notification went away before it was read (its caller was killed);
    OSError when the listener is unusable.
    """
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener, NOTIF_RECV, buf, True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    notif_id, pid, _flags, nr, _arch, _ip, *_args = _NOTIF.unpack(buf)
    try:
        fcntl.ioctl(listener, NOTIF_SEND, bytearray(_NOTIF_RESP.pack(notif_id, 0, -errno.EPERM, 0)), True)
    except OSError:
        pass  # the caller died meanwhile
    return pid, nr
