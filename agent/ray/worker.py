"""One attempt of one state, inside a Ray worker process: the body of the state's Ray task.

The task gets one ``run`` frame (the state function, cloudpickled by the driver, and the
context snapshot as encoded values), its attempt's token and the name of the driver's
relay actor. It runs the coroutine on the worker's event loop; each context write is
encoded in the worker (an unencodable value fails ``set_state`` right there) and pushed
to the relay within :data:`FLUSH_DELAY`, with those made meanwhile, in order; a
human-input request is pushed at once and the answer comes back through the relay. The
task returns one encoded value: the result or the failure, how many frames it pushed
(the driver applies all of them first), the frames it had not pushed yet, the captured
output and what it measured.

Output: while the attempt runs, file descriptors 1 and 2 (so C extensions and
subprocesses too) go to the worker process's capture file, beside Ray's own worker logs.
Its first line names the attempt, so that the driver can collect the output of a worker
that died. A Ray worker runs one task at a time, so taking over its descriptors and its
event loop for the attempt is safe; both are kept for the next attempt (making them
anew cost more than the task itself). As the engine does for inline states, a state
that never waits for anything is stepped once without running the loop (halves what a
no-op attempt costs in the worker, which Ray runs at nice 15).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import tempfile
import threading
import time
from typing import Any

import cloudpickle
import psutil

from .. import errors, remote
from ..context import Context
from ..errors import FailureReason, HumanInputError, exception_message, exception_text, exception_type_name
from ..executor import AttemptFailed
from ..human import HumanInputRequest, human_input_hook
from ..runtime.main_module import name_script_file
from . import wire

LOG_CAP = 8 * 1024 * 1024
"""At most this much of an attempt's output comes back (its tail)."""
FLUSH_DELAY = 0.005
"""How long a context write may wait in the worker to be pushed with the ones after it."""

_loop: asyncio.AbstractEventLoop | None = None
_capture: "Capture | None" = None
_relays: dict[str, Any] = {}
_functions: dict[bytes, Any] = {}


def run_attempt(task: tuple[bytes, str, str, Any, dict[str, Any] | None]) -> bytes:
    """The state's Ray task: ``task`` is the run frame, the attempt's token, the relay's name,
    for a confined state its isolation level and ResourceRequirements, and what names the
    driver's script (its functions' file; one argument: Ray handles one faster than five)."""
    global _loop, _capture
    payload, token, relay_name, confined, script = task
    began = time.process_time()
    run = wire.read_run(payload)
    if _capture is None:
        _capture = Capture(log_folder())
    if _loop is None or _loop.is_closed():
        # A plain selector loop, whatever the policy says (Ray's workers use uvloop's, which
        # makes a signal socket pair on every run: more than the rest of an attempt costs).
        _loop = asyncio.SelectorEventLoop()
    _capture.start(token)
    try:
        usage: dict[str, Any] = {"cpu_seconds": None}
        result, failure, pusher = _loop.run_until_complete(
            _attempt(run, token, relay_name, confined, usage, script))
        _tidy(_loop)
    finally:
        _end_children(kill=confined is None)
        output = _capture.finish()
    if usage["cpu_seconds"] is None:  # else the confined child's cgroup measured it
        usage["cpu_seconds"] = time.process_time() - began
    usage.update(ray_node_ip=_node_ip(), ray_worker_pid=os.getpid())
    return wire.encode_end(result, failure, pusher.pushed, pusher.unsent(), output, usage)


_known_children: set[int] = set()
"""This worker's children that outlive attempts by design: a confined state's supervisor's
zygote (:mod:`agent.ray.confine`), kept for the worker's next attempts."""


def _children() -> set[int]:
    """This process's children (each of its threads has its own list: Ray's worker has many)."""
    found: set[int] = set()
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as fh:
                found.update(int(pid) for pid in fh.read().split())
        except OSError:  # a thread that ended meanwhile
            pass
    return found


def _end_children(kill: bool) -> None:
    """End what an attempt started and left running (a subprocess, a forked child, with their
    own children), as a ``process`` state's cgroup ends with it: else it outlives its state
    and writes into the next attempt's output. A confined attempt's (its supervisor's
    zygote, ``kill`` False) stay: they serve the worker's next attempts."""
    global _known_children
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # reaps nothing
    except ChildProcessError:  # none at all (one system call): the usual case
        _known_children = set()
        return
    now = _children()
    left = now - _known_children
    if not kill or not left:
        _known_children = now
        return
    doomed: list[psutil.Process] = []
    for pid in left:
        try:
            parent = psutil.Process(pid)
            doomed += [parent, *parent.children(recursive=True)]
        except psutil.Error:  # exited meanwhile
            pass
    for proc in doomed:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(doomed, timeout=5)  # reaped, or reaped by their parent, before the next attempt
    _known_children = now - left


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())


async def _attempt(run: Any, token: str, relay_name: str, confined: Any, usage: dict[str, Any],
                   script: dict[str, Any] | None = None) -> tuple[Any, FailureReason | None, "Pusher"]:
    pusher = Pusher(relay_name, token)
    result: Any = None
    failure: FailureReason | None = None
    try:
        func = _function(run.function)
        name_script_file(func, script)  # a traceback names the script's lines, not "<dynamic-code>"
        classes = cloudpickle.loads(run.classes)  # noqa: F841 - defines them here, for the snapshot
        provider = RelayedHumanInput(pusher, token)
        snapshot, budget = wire.decode_snapshot(run)
        context = Context(
            snapshot, state_name=run.state_name, attempt=run.attempt, run_id=run.run_id, budget=budget,
            on_write=pusher.write, human_input=human_input_hook(provider, run_id=run.run_id, state=run.state_name),
        )
        context._failures = run.failures
        remote.set_link(_NO_COORDINATION)
        if confined is None:
            result = await func(context)
        else:
            from .confine import run_confined

            result, measured = await run_confined(func, context, run, *confined)
            usage.update(measured)
    except AttemptFailed as failed:  # the confined child failed: a limit kill, a crash, its exception
        failure = failed.reason
        usage.update(failed.usage)
    except BaseException as exc:  # noqa: BLE001 - the state's own failure, reported to the driver
        failure = _exception(exc)
    finally:
        remote.set_link(None)
    try:
        await pusher.drain()
    except Exception as exc:
        failure = failure or FailureReason(
            kind="lost_connection", message=f"the state's context writes could not reach the driver: {exc!r}")
    return result, failure, pusher


class _NoCoordination:
    """mutex() and ResourceAllocation in a state run on Ray: refused, not taken from a
    coordinator of this Ray worker that no other task shares."""

    async def take(self, kind: str, name: str, *_: Any) -> int:
        raise errors.CoordinationError(
            f"{kind} {name!r} taken inside a state run on Ray: the coordinator is the driver's and a Ray "
            "task cannot reach it; guard the state with add_state_coordination() instead")

    def give_back(self, holding: int) -> None:
        return None


_NO_COORDINATION = _NoCoordination()


def _function(data: bytes) -> Any:
    """The state function; the last few are kept, as a fan-out sends one many times."""
    func = _functions.get(data)
    if func is None:
        func = cloudpickle.loads(data)
        _functions[data] = func
        if len(_functions) > 32:
            _functions.pop(next(iter(_functions)))
    return func


def _exception(exc: BaseException) -> FailureReason:
    cls = type(exc)
    return FailureReason(kind="exception", message=exception_message(cls.__name__, exception_text(exc)),
                         exception_type=exception_type_name(cls), traceback=errors.traceback_text(exc))


def _relay(name: str) -> Any:
    """The driver's relay actor, looked up once per worker process."""
    handle = _relays.get(name)
    if handle is None:
        import ray

        handle = _relays[name] = ray.get_actor(name)
    return handle


class Pusher:
    """Sends the attempt's frames to the relay in order, batched, from a thread of its own:
    a frame waits at most ``FLUSH_DELAY`` seconds (or until the push in flight is done),
    also while the state's code blocks its event loop (CPU work, ``time.sleep``), so that a
    state stopped then keeps its progress; what is still waiting when the state returns
    goes back with its result instead, so a short state costs the relay nothing (the
    thread starts at the first write)."""

    def __init__(self, relay_name: str, token: str) -> None:
        self._relay_name = relay_name
        self._token = token
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._latest: dict[str, int] = {}  # key -> where its last write waits in _pending
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._now = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.pushed = 0

    def write(self, key: str, value: Any, deleted: bool) -> None:
        """The context's ``on_write`` hook."""
        self.send(wire.write_frame(key, value, deleted), key=key)

    def send(self, frame: bytes, *, now: bool = False, key: str | None = None) -> None:
        """Queue ``frame``; ``now`` pushes it without waiting (something waits on the driver).

        A write (``key``) replaces a write of the same key still waiting behind nothing
        else: a state that rewrites a big value while a push is in flight sends the last
        one, not each (they all went back with its result, over one frame's bound)."""
        if self._error is not None:
            raise errors.IsolationError(f"the relay to the driver is gone: {self._error!r}")
        with self._lock:
            latest = self._latest
            if key is None:
                latest.clear()  # a write before another kind of frame stays before it
            else:
                earlier = latest.get(key)
                if earlier is not None:
                    self._pending[earlier] = b""  # dropped when the frames are taken
                latest[key] = len(self._pending)
            self._pending.append(frame)
            self._now = self._now or now
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="agent-ray-pusher", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        import ray

        relay = _relay(self._relay_name)
        while True:
            self._wake.wait()
            self._wake.clear()
            if not self._now:
                self._stop.wait(FLUSH_DELAY)  # with those made meanwhile; at once when drained
            with self._lock:
                if self._closing:
                    return  # what is left goes back with the result
                frames, self._pending, self._now = [f for f in self._pending if f], [], False
                self._latest.clear()
            if not frames:
                continue
            try:
                ray.get(relay.push.remote(self._token, frames))
            except Exception as exc:  # noqa: BLE001 - reported by the next send() or drain()
                self._error = exc
                return
            self.pushed += len(frames)

    async def drain(self) -> None:
        """Wait for the push in flight; what has not been pushed stays for :meth:`unsent`."""
        thread = self._thread
        if thread is not None:
            with self._lock:
                self._closing = True
            self._stop.set()
            self._wake.set()
            await asyncio.to_thread(thread.join)
        if self._error is not None:
            raise self._error

    def unsent(self) -> list[bytes]:
        frames, self._pending = [f for f in self._pending if f], []
        self._latest.clear()
        return frames


class RelayedHumanInput:
    """A human-input provider that asks the driver's provider through the relay."""

    def __init__(self, pusher: Pusher, token: str) -> None:
        self._pusher = pusher
        self._token = token
        self._ids = itertools.count(1)
        self._questions: dict[str, int] = {}  # a question's request id -> its number on the wire

    async def ask(self, request: HumanInputRequest) -> str:
        request_id = next(self._ids)
        question = self._questions.setdefault(request.id, request_id)  # re-asks keep the first number
        remaining = None
        if request.timeout is not None:
            remaining = max(0.0, request.created + request.timeout - time.time())
        self._pusher.send(wire.human_request(request_id, request.prompt, request.timeout, request.default,
                                             question=question, attempt=request.attempt, rejected=request.rejected,
                                             left=remaining), now=True)
        relay = _relay(self._pusher._relay_name)
        response = wire.read_human_response(await relay.wait_answer.remote(self._token, request_id))
        if response.error_type is not None:
            cls = getattr(errors, response.error_type, None)
            if not (isinstance(cls, type) and issubclass(cls, HumanInputError)):
                cls = HumanInputError
            raise cls(response.error or "human input failed")
        return response.answer or ""


# --- output --------------------------------------------------------------------------------


def log_folder() -> str:
    """Where this node keeps attempts' output: beside Ray's own worker logs, in the session's
    ``logs/agent`` folder (else a private temporary one)."""
    try:
        import ray._private.worker as ray_worker

        folder = os.path.join(ray_worker.global_worker.node.get_session_dir_path(), "logs", "agent")
    except Exception:  # Ray's layout is not a public API: fall back rather than fail
        folder = os.path.join(tempfile.gettempdir(), f"agent-ray-logs-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


class Capture:
    """The worker process's capture file: emptied for each attempt, its token on the first line."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, f"worker-{os.getpid()}.log")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._size = 0
        self._saved: tuple[int, int] | None = None

    def start(self, token: str) -> None:
        """Send descriptors 1 and 2 here, after a first line naming the attempt."""
        header = f"{token}\n".encode()
        _flush_std()
        if self._size != len(header):  # else the last attempt printed nothing: overwrite its token
            os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, header, 0)
        self._size = len(header)
        os.lseek(self._fd, self._size, os.SEEK_SET)
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(self._fd, 1)
        os.dup2(self._fd, 2)

    def finish(self) -> bytes:
        """Give descriptors 1 and 2 back; what the attempt wrote."""
        _flush_std()
        if self._saved is not None:
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            os.close(self._saved[0])
            os.close(self._saved[1])
            self._saved = None
        end = os.lseek(self._fd, 0, os.SEEK_CUR)
        header = self._size
        self._size = max(end, os.fstat(self._fd).st_size) if end != header else header
        return _read(self._fd, header) if self._size != header else b""


def collect_log(token: str) -> bytes | None:
    """The output of attempt ``token`` on this node, if a worker here ran it (for the driver,
    when that worker died or was killed); the file of a dead worker is removed."""
    for path in glob.glob(os.path.join(log_folder(), "worker-*.log")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            header = f"{token}\n".encode()
            if os.pread(fd, len(header), 0) != header:
                continue
            data = _read(fd, len(header))
        finally:
            os.close(fd)
        pid = int(os.path.basename(path)[len("worker-"):-len(".log")])
        if not psutil.pid_exists(pid):
            with contextlib.suppress(OSError):
                os.unlink(path)
        return data
    return None


def _read(fd: int, start: int) -> bytes:
    """The output after the header (its last LOG_CAP bytes)."""
    size = os.fstat(fd).st_size - start
    skip = max(0, size - LOG_CAP)
    data = os.pread(fd, size - skip, start + skip) if size > 0 else b""
    if skip:
        data = f"[... the first {skip} bytes of output were dropped ...]\n".encode() + data
    return data


def _flush_std() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _tidy(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the state left running on the loop, so that nothing of it outlives the attempt."""
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
