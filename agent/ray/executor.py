"""The ``ray`` executor: each attempt of a state runs as one Ray task on the cluster.

Our engine decides *when* (admission, priorities, preemption, retries, timeouts); Ray
decides *where* and runs it. An attempt becomes a task asking for ``num_cpus`` =
``cpu_units``, ``num_gpus`` = ``gpu_units`` and ``memory`` = ``memory_mb`` MiB (only the
types the state's ``ResourceRequirements`` accounts; a state that declares nothing asks
for Ray's default, one CPU), plus what :func:`~agent.ray.options.ray_options` declared.
Ray's own retries are off (``max_retries=0``): a failed attempt is retried, or not, by
the state's retry policy. Stopping an attempt (timeout, cancel, preemption, pause) is
``ray.cancel(force=True)``: the worker process is killed at once; its context writes
have reached the driver, but for those of its last few milliseconds
(:data:`agent.ray.worker.FLUSH_DELAY`).

Values cross as described in :mod:`agent.ray.wire`; frames from running tasks arrive
through the driver's relay actor (:mod:`agent.ray.relay`) and are applied in the order
each task sent them, last writer wins. The attempt's captured output is kept on the
driver, per (run, state, attempt), and ``agent.logs(state)`` reads it; when the worker
died or was killed, it is collected from the node afterwards.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import secrets
import threading
from typing import Any

import ray
from ray import exceptions as rx

from .. import values
from .._types import ResourceType
from ..context import encode_snapshot, filled_by_others
from ..errors import (
    BoundExceededError,
    ContextBudgetError,
    FailureReason,
    HumanInputError,
    IsolationError,
    IsolationUnavailableError,
    ProtocolError,
    UnsendableStateError,
)
from ..executor import Attempt, AttemptFailed, AttemptOutcome
from ..human import ask_relayed
from ..ipc.messages import ContextWrite, HumanInputRequest
from ..supervisor.logger import get_logger
from ..supervisor.logs import AttemptLogs
from ..runtime import main_module
from ..supervisor.output import current_writer, label_for
from ..supervisor.pickled import PickledFunctions, dumps, unsendable
from ..supervisor.process import uncancellable
from . import wire, worker
from .cluster import Capacity, connect, is_connected
from .options import options_of
from .relay import Relay

POLL_SECONDS = 10.0
"""How long one long-poll of the relay waits on the actor when nothing arrives."""
IDLE_SECONDS = 0.5
"""How long the long-poll goes on once no attempt runs (the next one may start soon)."""
SETTLE_SECONDS = 30.0
"""How long the end of an attempt waits for frames its task sent before it returned."""
STOP_SECONDS = 10.0
"""How long a stopped attempt waits for Ray to confirm that its task is gone."""
LOG_SECONDS = 10.0
"""How long the driver waits for the output of a worker that died."""
NODES_SECONDS = 10.0
"""How long the driver waits for the cluster to say which nodes are alive (before a launch)."""
CONNECTED_CHECK_SECONDS = 1.0
"""How often an attempt waiting for its task looks whether this process is still connected
to Ray: after a ``ray.shutdown()`` its result can never come, and the wait never ended."""
SILENT_KEPT = 100_000
"""How many attempts without output are remembered as such (oldest forgotten first)."""

_log = get_logger("agent.ray")
_NO_CLASSES = dumps(())


class RayExecutor:
    """Runs attempts as Ray tasks; one per process, connected on first use."""

    def __init__(self) -> None:
        self.logs = AttemptLogs()
        atexit.register(self.logs.remove)
        self.capacity = Capacity(ray.nodes)
        self.relay = RelayLink()
        self._lock = threading.Lock()
        self._task: Any = None
        self._collect: Any = None
        self._submitters: dict[str, Any] = {}
        self._silent: dict[tuple[str, str, int], None] = {}
        self._shapes: dict[tuple[int, Any], tuple[Any, dict[str, Any], dict[str, float]]] = {}
        # Attempt tokens: unique on the cluster (the prefix) and cheap (no random bytes each).
        self._prefix = secrets.token_hex(4)
        self._tokens = itertools.count(1)
        self._pickled = PickledFunctions()

    def _prepare(self) -> None:
        with self._lock:
            if self._task is None:
                self._collect = ray.remote(num_cpus=0, max_retries=0)(worker.collect_log)
                self.relay.actor_class = ray.remote(num_cpus=0, max_restarts=0)(Relay)
                self._task = ray.remote(max_retries=0, retry_exceptions=False)(worker.run_attempt)

    def _options(self, attempt: Attempt) -> tuple[dict[str, Any], dict[str, float]]:
        """:func:`task_options`, kept per state (its requirements and function do not change)."""
        key = (id(attempt.resources), attempt.func)
        try:
            found = self._shapes.get(key)
        except TypeError:  # an unhashable state callable
            return task_options(attempt)
        if found is None or found[0] is not attempt.resources:
            found = self._shapes[key] = (attempt.resources, *task_options(attempt))
            if len(self._shapes) > 4096:
                self._shapes.pop(next(iter(self._shapes)))
        return found[1], found[2]

    def _submitter(self, options: dict[str, Any]) -> Any:
        """The task with these options (Ray checks options each time ``.options()`` is called)."""
        key = repr(sorted(options.items()))
        found = self._submitters.get(key)
        if found is None:
            found = self._submitters[key] = self._task.options(**options)
            if len(self._submitters) > 1024:
                self._submitters.pop(next(iter(self._submitters)))
        return found

    def _payload(self, attempt: Attempt, snapshot: dict[str, bytes], classes: tuple[type, ...]) -> bytes:
        """The attempt's ``run`` frame. The function is as it is when the attempt launches: its
        pickle is reused only while nothing it copies changed (:class:`PickledFunctions`)."""
        try:
            function = self._pickled.dumps(attempt.func)
        except Exception as exc:
            raise UnsendableStateError(unsendable(attempt.state_name, attempt.func, exc, "Ray")) from exc
        return wire.encode_run(attempt.run_id, attempt.agent_name, attempt.state_name, attempt.number, function,
                               dumps(classes) if classes else _NO_CLASSES, snapshot,
                               attempt.context)

    async def run_attempt(self, attempt: Attempt) -> AttemptOutcome:
        if not is_connected():
            await asyncio.to_thread(connect)  # ray.init takes seconds: not on the loop
        self._prepare()
        options, request = self._options(attempt)
        await self._check_capacity(attempt.state_name, request)
        snapshot, classes = encode_snapshot(attempt.context, attempt.state_name, wire.BOUNDS)
        payload = self._payload(attempt, snapshot, classes)
        token = f"{self._prefix}{next(self._tokens):08x}"
        channel = self.relay.open(token, attempt)
        try:
            script = main_module.describe()  # its state functions' files, for tracebacks
            ref = self._submitter(options).remote((payload, token, self.relay.name, _confined(attempt), script))
            try:
                data = await _while_connected(ref)
            except asyncio.CancelledError:
                await uncancellable(self._stop(ref, token, attempt))
                raise
            except rx.RayError as exc:
                reason = ray_failure(exc)
                log = await self._collect_log(token)
                self._keep_log(attempt, log)
                raise AttemptFailed(_with_log(reason, log)) from None
            return await self._ended(attempt, channel, data)
        finally:
            self.relay.close(token)

    async def _ended(self, attempt: Attempt, channel: "Channel", data: Any) -> AttemptOutcome:
        try:
            end = wire.decode_end(data)
        except ProtocolError as exc:
            raise AttemptFailed(FailureReason(kind="protocol", message=f"the state's Ray task: {exc}")) from None
        self._keep_log(attempt, end.log)
        usage = _usage(end.usage)
        attempt.usage.update(usage)
        try:
            await channel.settled(end.pushed, SETTLE_SECONDS)
        except TimeoutError:
            raise AttemptFailed(FailureReason(
                kind="lost_connection",
                message=f"{end.pushed - channel.received} of the {end.pushed} frames the state's task pushed "
                "never reached the driver through the relay actor",
            ), usage) from None
        if end.frames:
            channel.deliver(end.frames)
        if channel.failure is not None:
            raise AttemptFailed(channel.failure, usage)
        if end.failure is not None:
            raise AttemptFailed(end.failure, usage)
        return AttemptOutcome(end.result, usage)

    async def _stop(self, ref: Any, token: str, attempt: Attempt) -> None:
        """Kill the task's worker (``attempt.stop_reason`` says why) and wait until Ray says so."""
        ray.cancel(ref, force=True)
        data = None
        try:
            data = await asyncio.wait_for(_settle(ref), STOP_SECONDS)
        except TimeoutError:
            _log.warning("ray_cancel_unconfirmed", state=attempt.state_name, reason=attempt.stop_reason)
        log = None
        if data is not None:  # it returned before the cancel reached it: its output came with it
            try:
                log = wire.decode_end(data).log
            except ProtocolError:
                pass
        self._keep_log(attempt, log if log is not None else await self._collect_log(token))

    async def _check_capacity(self, state: str, request: dict[str, float]) -> None:
        """:meth:`Capacity.check`, its reading of the nodes (a call to the cluster, which blocks
        while that is unreachable) off the event loop and bounded."""
        if self.capacity.needs_reading(request):
            try:
                await asyncio.wait_for(asyncio.to_thread(self.capacity.read), NODES_SECONDS)
            except TimeoutError:
                raise IsolationUnavailableError(
                    f"the Ray cluster did not say within {NODES_SECONDS:g} s which of its nodes are alive: "
                    "is it still up? (ray status)"
                ) from None
        self.capacity.check(state, request, read=False)

    async def _collect_log(self, token: str) -> bytes:
        """The output a dead worker left on its node (each alive node is asked; bounded, also
        when the cluster itself is gone)."""
        try:
            return await asyncio.wait_for(self._ask_nodes_for_log(token), LOG_SECONDS)
        except TimeoutError:
            return b"[the output of this attempt could not be collected from its node]\n"

    async def _ask_nodes_for_log(self, token: str) -> bytes:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = await asyncio.to_thread(ray.nodes)  # blocks while the cluster is unreachable: off the loop
        refs = [
            self._collect.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(token)
            for node in nodes if node.get("Alive")
        ]
        for item in await asyncio.gather(*refs, return_exceptions=True):
            if type(item) is bytes:
                return item
        return b""

    def _keep_log(self, attempt: Attempt, data: bytes) -> None:
        """Output goes to the attempt's log file (kept as the supervisor keeps its own, see
        :class:`~agent.supervisor.logs.LogRetention`) and is echoed, each line prefixed with
        the state's name, as isolated states' output is (when the attempt ends, not live).
        An attempt that printed nothing gets no file (creating one costs more than a no-op
        state), only a note that it ran here. A state that runs again in the same run
        (a loop) starts at attempt 1 again: its output is appended after the earlier one's,
        as the supervisor does for isolated states."""
        key = (attempt.run_id, attempt.state_name, attempt.number)
        if not data:
            if not os.path.exists(self.logs.path(*key)):  # else an earlier lap's output stays readable
                self._silent[key] = None
                if len(self._silent) > SILENT_KEPT:
                    self._silent.pop(next(iter(self._silent)))
            return
        self._silent.pop(key, None)
        path = self.logs.path(*key, create=True)
        with open(path, "ab") as fh:
            fh.write(data)
        self.logs.finished(path, len(data))
        writer = current_writer()
        if writer is not None:
            lines = data.decode("utf-8", "replace").splitlines()
            try:
                writer(label_for(attempt.state_name, attempt.number), lines)
            except Exception:  # an echo never fails the attempt: the log has it all
                pass

    def read_log(self, run_id: str, state: str, attempt: int) -> str | None:
        if (run_id, state, attempt) in self._silent:
            return ""
        if not os.path.exists(self.logs.path(run_id, state, attempt)):
            return None
        return self.logs.read(run_id, state, attempt)

    async def aclose(self) -> None:
        """Nothing per run: the relay and the connection go away with the process."""
        return None


# --- the relay, driver side -------------------------------------------------------------


class RelayLink:
    """The driver's end of the relay: one long-poll while attempts run, frames to their channels."""

    def __init__(self) -> None:
        self.actor_class: Any = None
        self.handle: Any = None
        self.name = ""
        self._connection: tuple[str, str] | None = None  # the driver's node and job it was made under
        self._channels: dict[str, Channel] = {}
        self._seen = 0
        self._poller: asyncio.Task[None] | None = None
        self._poller_loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.TimerHandle | None = None

    def open(self, token: str, attempt: Attempt) -> "Channel":
        loop = asyncio.get_running_loop()
        if self.handle is None or _connection() != self._connection:
            # A ray.shutdown() and ray.init() end the actors of the connection before (a new
            # local cluster has new nodes, a cluster connected to again a new job): a relay
            # per connection. Named, so that a task looks it up once per worker, and only
            # when it has something to send.
            if self._poller is not None and not self._poller.done() and self._poller_loop is loop:
                self._poller.cancel()  # it waits on the relay of the connection before
            self._poller = None
            self.name = f"agent-relay-{os.getpid()}-{secrets.token_hex(4)}"
            self.handle = self.actor_class.options(name=self.name).remote()
            self._connection = _connection()  # after the call, which connects if nothing did
            self._seen = 0
        if self._poller is not None and self._poller_loop is not loop:
            old = self._poller_loop
            if old is not None and old.is_running() and not old.is_closed():
                raise IsolationError(
                    "Ray states of one process must run on one event loop at a time: "
                    "finish the run on the other loop first"
                )
            self._poller = self._idle = None  # its loop is gone, and the task with it
        channel = self._channels[token] = Channel(token, attempt, self)
        if self._poller is None or self._poller.done():  # none yet, or it ended (idle, relay lost)
            self._poller_loop = loop
            self._poller = loop.create_task(self._poll())
        return channel

    def close(self, token: str) -> None:
        channel = self._channels.pop(token, None)
        if channel is not None:
            channel.close()
        if not self._channels and self._poller is not None and self._idle is None and self._poller_loop:
            # Not at once: the next state of a chain would start a new long-poll (an actor call).
            self._idle = self._poller_loop.call_later(IDLE_SECONDS, self._stop_if_idle)

    def _stop_if_idle(self) -> None:
        self._idle = None
        if not self._channels and self._poller is not None:
            self._poller.cancel()
            self._poller = None

    async def _poll(self) -> None:
        try:
            while self._channels:
                first, entries = await self.handle.take.remote(self._seen, POLL_SECONDS)
                for offset, (token, frames) in enumerate(entries):
                    if first + offset >= self._seen and token in self._channels:
                        self._channels[token].deliver(frames)
                self._seen = max(self._seen, first + len(entries))
        except rx.RayError as exc:  # the relay actor died: what it held for these attempts is lost
            self.handle = None
            for channel in list(self._channels.values()):
                channel.broken(f"the relay actor that carries context writes died: {exc}")


def _connection() -> tuple[str, str] | None:
    """This driver's node and job on the Ray cluster it is connected to (None: not connected;
    asking Ray's runtime context would connect)."""
    if not ray.is_initialized():
        return None
    runtime = ray.get_runtime_context()
    return runtime.get_node_id(), runtime.get_job_id()


class _StoppedForOthers(Exception):
    """A write that fitted what the attempt could see, refused for other states' writes."""

    def __init__(self, reason: FailureReason) -> None:
        super().__init__(reason.message)
        self.reason = reason


class Channel:
    """The driver's end of one attempt: applies its frames in order and answers its questions."""

    def __init__(self, token: str, attempt: Attempt, link: RelayLink) -> None:
        self.token = token
        self.attempt = attempt
        self.link = link
        self.received = 0
        self.failure: FailureReason | None = None
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._questions: dict[int, str] = {}  # the task's question -> its request id (ask_relayed)
        self._asked = False
        self._launch_used = attempt.context.budget.used  # the budget its snapshot held
        self._written = 0  # what its own writes added to the budget since

    def deliver(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.received += 1
            if self.failure is None:
                try:
                    self._apply(frame)
                except _StoppedForOthers as stopped:
                    self.failure = stopped.reason
                except (BoundExceededError, ContextBudgetError) as exc:  # as for a state process
                    self.failure = FailureReason(kind="bound", message=f"a frame from the state's Ray task: {exc}")
                except Exception as exc:  # malformed, or applying it failed (a context hook raised)
                    self.failure = FailureReason(kind="protocol", message=f"a frame from the state's Ray task: {exc}")
        self._wake()

    def _apply(self, frame: bytes) -> None:
        msg = wire.read_frame(frame)
        context = self.attempt.context
        if isinstance(msg, ContextWrite):
            sizes = context.budget.sizes
            before = sizes.get(msg.key, 0)
            if msg.deleted:
                context.remove_state(msg.key)
            else:
                try:
                    context.set_state(msg.key, msg.value)
                except ContextBudgetError as exc:  # as for a state process
                    stopped = filled_by_others(exc, self._launch_used + self._written,
                                               values.entry_check(msg.key, msg.value), context.budget.limit)
                    if stopped is None:
                        raise
                    raise _StoppedForOthers(stopped) from None
            self._written += sizes.get(msg.key, 0) - before
        elif isinstance(msg, HumanInputRequest):
            self._asked = True
            task = asyncio.ensure_future(self._answer(msg))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        else:
            raise ProtocolError(f"a {msg.TYPE} message is not expected from a Ray task")

    async def _answer(self, req: HumanInputRequest) -> None:
        answer: str | None = None
        error_type = error = None
        try:
            answer = await ask_relayed(self.attempt.context, self._questions, req.question, req.prompt, req.timeout,
                                       req.default, req.attempt, req.rejected, req.left, default_there=False)
        except HumanInputError as exc:
            error_type, error = type(exc).__name__, str(exc)
        except Exception as exc:  # a provider failed: the state raises HumanInputError
            error_type, error = "HumanInputError", f"human input failed: {exc!r}"
        if self.link.handle is not None:
            frame = wire.human_response(req.request_id, answer, error_type, error)
            await self.link.handle.answer.remote(self.token, req.request_id, frame)

    def broken(self, why: str) -> None:
        if self.failure is None:
            self.failure = FailureReason(kind="lost_connection", message=why)
        self._want = 0
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done() and self.received >= self._want:
            self._waiter.set_result(None)

    async def settled(self, count: int, timeout: float) -> None:
        """Wait until the first ``count`` frames of the attempt have been applied."""
        if self.received >= count or self.failure is not None:
            return
        self._want = count
        self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(self._waiter, timeout)

    def close(self) -> None:
        for task in self._answering:
            task.cancel()
        if self._asked and self.link.handle is not None:
            self.link.handle.forget.remote(self.token)


# --- mapping ----------------------------------------------------------------------------


def task_options(attempt: Attempt) -> tuple[dict[str, Any], dict[str, float]]:
    """Ray's ``.options()`` for the attempt's task, and the resources it asks a node for."""
    if attempt.resources is None:
        cpus, gpus, memory = 1.0, 0.0, 0.0  # Ray's own default for a task
    else:
        amounts = attempt.resources.amounts()
        cpus = amounts.get(ResourceType.CPU, 0.0)
        gpus = amounts.get(ResourceType.GPU, 0.0)
        memory = amounts.get(ResourceType.MEMORY, 0.0) * 1024 * 1024
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    request = {"CPU": cpus}
    if gpus:
        request["GPU"] = gpus
    if memory:
        options["memory"] = int(memory)
        request["memory"] = float(int(memory))
    extra = options_of(attempt.func)
    if extra is not None:
        options.update(extra.task_options())
        request.update({name: amount for name, amount in extra.resources.items() if amount})
        if extra.accelerator_type is not None:
            request[f"accelerator_type:{extra.accelerator_type}"] = 0.001
    return options, {name: amount for name, amount in request.items() if amount}


def _confined(attempt: Attempt) -> tuple[str, Any] | None:
    """For a state confined on its node: the isolation level and the limits (see :mod:`agent.ray.confine`)."""
    extra = options_of(attempt.func)
    if extra is None or extra.isolation is None:
        return None
    return extra.isolation, attempt.resources


def ray_failure(exc: BaseException) -> FailureReason:
    """Why Ray says the attempt's task did not return."""
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, rx.OutOfMemoryError):
        return FailureReason(
            kind="limit", message=f"killed by Ray's memory monitor: the node ran short of memory ({said})",
            details={"limit": "ray_memory_monitor"},
        )
    if isinstance(exc, (rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError)):
        return FailureReason(
            kind="lost_connection",
            message="the Ray worker running this state died before it reported (a crash, os._exit, "
            f"a signal, or the kernel's OOM killer); Ray says: {said}",
        )
    if isinstance(exc, rx.TaskCancelledError):
        return FailureReason(kind="cancelled", message=f"the state's Ray task was cancelled outside this run: {said}")
    if isinstance(exc, rx.RuntimeEnvSetupError):
        return FailureReason(kind="exception", message=f"Ray could not set up the state's runtime_env: {said}",
                             exception_type="ray.exceptions.RuntimeEnvSetupError", traceback=str(exc))
    if isinstance(exc, rx.RayTaskError):  # the task failed outside the state (e.g. loading it)
        return FailureReason(kind="exception", message=f"the state's Ray task failed before the state ran: {said}",
                             exception_type=f"ray.exceptions.{type(exc).__name__}", traceback=str(exc))
    return FailureReason(kind="lost_connection", message=f"Ray lost the state's task: {type(exc).__name__}: {said}")


def _with_log(reason: FailureReason, log: bytes) -> FailureReason:
    if not log or reason.traceback:
        return reason
    import dataclasses

    return dataclasses.replace(reason, traceback=log[-16384:].decode("utf-8", "replace"))


_USAGE = {
    "cpu_seconds": (int, float), "peak_memory_bytes": (int,), "nr_throttled": (int,),
    "throttled_seconds": (int, float), "pids_peak": (int,), "io_read_bytes": (int,), "io_write_bytes": (int,),
    "ray_node_ip": (str,), "ray_worker_pid": (int,),
}


def _usage(reported: dict[str, Any]) -> dict[str, Any]:
    """What the task measured (a confined state: its cgroup), only known figures of the right type."""
    return {key: value for key, value in reported.items() if type(value) in _USAGE.get(key, ())}


async def _settle(ref: Any) -> Any:
    """Wait for a cancelled task's reference to resolve: what it returned, or None."""
    try:
        return await ref
    except rx.RayError:
        return None


# --- the seam agent.executor uses ----------------------------------------------------------

_executor: RayExecutor | None = None
_executor_lock = threading.Lock()


def get_executor() -> RayExecutor:
    """This process's Ray executor."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = RayExecutor()
        return _executor


def read_attempt_log(run_id: str, state: str, attempt: int) -> str | None:
    """The output of one Ray attempt, or None when this process ran no such attempt."""
    return _executor.read_log(run_id, state, attempt) if _executor is not None else None


async def _while_connected(ref: Any) -> Any:
    """``await ref``, failing the attempt (``lost_connection``) once this process is no longer
    connected to Ray (``ray.shutdown()`` on another thread): Ray then never settles the ref."""
    async def result() -> Any:
        return await ref

    waiting = asyncio.ensure_future(result())
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=CONNECTED_CHECK_SECONDS)
            if done:
                return waiting.result()
            if not is_connected():
                raise AttemptFailed(FailureReason(
                    kind="lost_connection",
                    message="this process's connection to the Ray cluster was closed (ray.shutdown()) while the "
                    "state's task ran: its result can never come back",
                ))
    finally:
        if not waiting.done():
            waiting.cancel()
