"""State functions that try to get out of their sandbox and report what they managed.

Module level, so that a sandboxed child loads them by import (before it drops root).
Each keeps a dict of plain values under the context key ``out``: the tests decide what
must not have worked.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import socket
import subprocess
import time
from typing import Any

from agent.runtime import seccomp

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.shmat.restype = ctypes.c_void_p
IPC_CREAT = 0o1000
SHM_KEY, SEM_KEY, MSG_KEY = 0x4A6E1, 0x4A6E2, 0x4A6E3
MQ_NAME = b"/agent-test-tenant"
MARK = "agent-test-tenant"
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")


def reports(func: Any) -> Any:
    """The state ``func`` with what it returns kept under ``out`` (a state itself returns None)."""

    @functools.wraps(func)
    async def state(context: Any) -> None:
        context.set_state("out", await func(context))

    return state


def _errno_of(result: int) -> str:
    return "ok" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def _try(fn: Any) -> str:
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


# --- two tenants on one uid ------------------------------------------------------------------


@reports
async def leave_traces(context: Any) -> dict[str, Any]:
    """Leave everything a tenant could leave for the next one on the same uid."""
    out: dict[str, Any] = {"uid": os.getuid()}
    shm = libc.shmget(SHM_KEY, 1 << 20, IPC_CREAT | 0o666)
    out["shm"] = _errno_of(shm)
    if shm >= 0:
        addr = libc.shmat(shm, None, 0)
        ctypes.memmove(addr, MARK.encode(), len(MARK))
        libc.shmdt(ctypes.c_void_p(addr))
    out["sem"] = _errno_of(libc.semget(SEM_KEY, 1, IPC_CREAT | 0o666))
    out["msg"] = _errno_of(libc.msgget(MSG_KEY, IPC_CREAT | 0o666))
    mq = libc.mq_open(MQ_NAME, os.O_CREAT | os.O_RDWR, 0o666, None)
    out["mqueue"] = _errno_of(mq)
    if mq >= 0:
        libc.mq_send(mq, MARK.encode(), len(MARK), 0)
    for folder in WORLD_WRITABLE:
        path = os.path.join(folder, MARK)

        def write(path: str = path) -> None:
            with open(path, "w") as fh:
                fh.write(MARK)
            os.chmod(path, 0o4777)  # a setuid-to-this-uid file, for whoever comes next

        out[f"file {folder}"] = _try(write)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(b"\0" + MARK.encode())
    listener.listen()
    out["abstract socket"] = "ok"
    pid = os.fork()
    if pid == 0:  # a daemon that outlives the state: double fork, new session
        if os.fork() == 0:
            os.setsid()
            while True:
                time.sleep(60)
        os._exit(0)
    os.waitpid(pid, 0)
    out["daemon"] = "ok"
    return out


@reports
async def look_for_traces(context: Any) -> dict[str, Any]:
    """What of the previous tenant this one can find."""
    found: dict[str, Any] = {"uid": os.getuid()}
    found["shm"] = _errno_of(libc.shmget(SHM_KEY, 0, 0))
    found["sem"] = _errno_of(libc.semget(SEM_KEY, 0, 0))
    found["msg"] = _errno_of(libc.msgget(MSG_KEY, 0))
    found["mqueue"] = _errno_of(libc.mq_open(MQ_NAME, os.O_RDONLY, 0, None))
    for folder in WORLD_WRITABLE:
        found[f"file {folder}"] = os.path.exists(os.path.join(folder, MARK))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    found["abstract socket"] = _try(lambda: probe.connect(b"\0" + MARK.encode()))
    found["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return found


# --- one escape each -----------------------------------------------------------------------


@reports
async def try_denied_calls(context: Any) -> dict[str, str]:
    """Every call the filter must refuse, called directly; errno names."""
    table = seccomp.ARCHES[seccomp.machine()][1]
    out = {}
    for name in (*seccomp.DENIED, *seccomp.QUIET, "clone3"):
        out[name] = _errno_of(libc.syscall(ctypes.c_long(table[name]), 0, 0, 0, 0, 0))
    out["unshare(CLONE_NEWUSER)"] = _errno_of(libc.unshare(seccomp.CLONE_NEWUSER))
    out["unshare(CLONE_NEWNS)"] = _errno_of(libc.unshare(seccomp.CLONE_NEWNS))
    out["personality(PER_LINUX32)"] = _errno_of(libc.personality(0x0008))
    out["socket(AF_VSOCK)"] = _errno_of(libc.socket(seccomp.AF_VSOCK, socket.SOCK_STREAM, 0))
    out["socket(AF_INET)"] = _errno_of(libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0))
    unshare = subprocess.run(["unshare", "-rm", "id", "-u"], capture_output=True, text=True)
    out["unshare -rm"] = f"{unshare.returncode} {unshare.stdout.strip()} {unshare.stderr.strip()}"
    # still fine: a plain fork, a thread, a subprocess
    out["fork"] = str(subprocess.run(["true"]).returncode)
    return out


async def die_of_unshare(context: Any) -> None:
    if libc.unshare(seccomp.CLONE_NEWUSER | seccomp.CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


async def abort(context: Any) -> None:
    os.abort()  # as PID 1 of its PID namespace, its own SIGABRT cannot end it


async def fork_bomb(context: Any) -> None:
    hold_r, hold_w = os.pipe()
    while True:
        if os.fork() == 0:
            os.close(hold_w)
            os.read(hold_r, 1)
            os._exit(0)


async def fork_bomb_everywhere(context: Any) -> None:
    while True:  # every process it makes forks too
        os.fork()


@reports
async def fill_tmp(context: Any) -> dict[str, Any]:
    """Write up to 1 GiB into /tmp, 32 MiB files at a time."""
    chunk = b"x" * (1 << 20)
    written, error = 0, None
    try:
        for i in range(32):
            with open(f"/tmp/fill-{i}", "wb") as fh:
                for _ in range(32):
                    fh.write(chunk)
                    written += len(chunk)
    except OSError as exc:
        error = errno.errorcode.get(exc.errno or 0)
    return {"written": written, "error": error}


async def write_big_file(context: Any) -> None:
    with open("/tmp/big", "wb") as fh:
        fh.write(b"x" * (int(context.get_state("mb")) << 20))


async def print_a_lot(context: Any) -> None:
    line = "y" * 1023
    for _ in range(int(context.get_state("mb")) << 10):
        print(line)


@reports
async def look_at_processes(context: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0)}
    out["proc"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    readable = []
    for pid in out["proc"]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                readable.append(fh.read().decode(errors="replace"))
        except OSError:
            pass
    out["cmdlines"] = readable
    for name in ("supervisor", "zygote"):
        pid = int(context.get_state(name))
        out[f"kill {name}"] = _try(lambda pid=pid: os.kill(pid, signal.SIGKILL))
        out[f"read {name}"] = _try(lambda pid=pid: open(f"/proc/{pid}/cmdline").read())
    out["kill -1"] = _try(lambda: os.kill(-1, signal.SIGKILL))
    out["tty"] = _try(lambda: open("/dev/tty").close())
    return out


@reports
async def look_at_mounts(context: Any) -> dict[str, Any]:
    mounts = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            mounts[fields[4]] = fields[5].split(",")
    writes = {}
    for path in ("/etc/agent-test", "/run/lock/agent-test", "/usr/agent-test", "/sys/fs/cgroup/agent-test",
                 "/tmp/agent-test", "/var/tmp/agent-test2", "/dev/shm/agent-test", "/dev/agent-test"):
        writes[path] = _try(lambda path=path: open(path, "w").close())
    return {"mounts": mounts, "writes": writes, "dev": sorted(os.listdir("/dev"))}


@reports
async def search_keyrings(context: Any) -> dict[str, Any]:
    description = context.get_state("key")
    with open("/proc/keys") as fh:
        listed = description in fh.read()
    found = libc.syscall(ctypes.c_long(seccomp.ARCHES[seccomp.machine()][1]["keyctl"]), 10, -3,  # KEYCTL_SEARCH
                         b"user", description.encode(), 0)
    return {"listed": listed, "search": _errno_of(found)}


@reports
async def read_scoped(context: Any) -> dict[str, Any]:
    from agent.context import Context
    from agent.errors import ContextScopeError

    out: dict[str, Any] = {"keys": sorted(context.keys()), "input": context.get_state("input_rows")}
    for verb, call in (("read api_key", lambda: context.get_state("api_key")),
                       ("write approved", lambda: context.set_state("approved", True)),
                       ("has api_key", lambda: context.has_state("api_key"))):
        try:
            call()
            out[verb] = "ok"
        except ContextScopeError as exc:
            out[verb] = str(exc)
    context.set_state("result", 42)
    if "bypass" in context.keys():
        Context.set_state(context, "approved", True)  # past the child's check: the supervisor's holds
    return out


async def allocate(context: Any) -> None:
    blocks = []
    for _ in range(int(context.get_state("mb"))):
        blocks.append(bytearray(1 << 20))


@reports
async def scan_own_memory(context: Any) -> dict[str, Any]:
    """Look for a secret in every readable mapping of this process.

    The secret is given in two halves and never put together here (the search pattern
    would be found in memory itself): a hit is the first half followed by the second.
    """
    first, second = (bytes.fromhex(h) for h in context.get_state("halves_hex"))
    hits = []
    with open("/proc/self/maps") as fh:
        regions = [line.split() for line in fh]
    for fields in regions:
        start, end = (int(x, 16) for x in fields[0].split("-"))
        path = fields[5] if len(fields) > 5 else ""
        if not fields[1].startswith("r") or path.startswith("[v") or end - start > 1 << 30:
            continue
        data = ctypes.string_at(start, end - start)
        at = data.find(first)
        while at >= 0:
            if data[at + len(first): at + len(first) + len(second)] == second:
                hits.append(path or fields[0])
            at = data.find(first, at + 1)
    in_environ = any(v.startswith(first.decode()) and v.endswith(second.decode()) for v in os.environ.values())
    return {"hits": hits, "environ": in_environ}


async def wait_for_file(context: Any) -> None:
    path = context.get_state("path")
    while not os.path.exists(path):
        time.sleep(0.01)


async def leaks_a_secret(context: Any) -> None:
    raise ValueError("upstream rejected credential sk-live-123")


async def reads_failures(context: Any) -> None:
    context.set_state("seen", context.failed_states())


async def prints_escapes(context: Any) -> None:
    print("\x1b[2K\rother_state | APPROVED\x1b]0;owned\x07", flush=True)


# Plain states of the tests, here rather than in the test modules: each child imports the
# module of its state, and a test module's imports (pytest) take seconds on an emulated machine.

async def note_pid(context: Any) -> None:
    context.set_state("pid", os.getpid())


async def note_uid(context: Any) -> None:
    context.set_state("uid", os.getuid())


async def uid_then_b(context: Any) -> str:
    context.set_state("a", os.getuid())
    return "b"


async def uid_of_b(context: Any) -> None:
    context.set_state("b", os.getuid())
