"""A job's runner: one submitted workflow, run as the user who submitted it.

agentd's spawner forks this process, puts it in the job's cgroup and drops it to the
user's uid, gids and a fresh environment before anything of the job is loaded; the
runner then speaks to agentd over the socket it inherited (``AGENT_RUNNER_FD``):

1. it receives ``job`` (the workflow's source as submitted, its parameters, the box's
   totals and the user's quota) and compiles and executes the source as module
   ``__agent_workflow__`` (the file's directory on ``sys.path``, like ``agent run``);
2. it takes the module's ``Agent`` (the one named ``agent``, or the only one), gives
   it agentd's pool (:class:`~agent.daemon.remote.RemotePool`: every state with
   resources is admitted by the box's one queue), the job's checkpoint store
   (``$AGENT_STATE_DIR/checkpoints.sqlite3``), and, unless it has its own, a human
   input provider answered with ``agentctl respond``;
3. it resumes the newest run in that store (after agentd restarted, a pause, or a
   failure being resumed: completed states do not run again), or starts a new run with
   the job's parameters as its initial context;
4. it reports the run (``started``), each state's status as it changes (``states``),
   questions for a human (``ask`` / ``withdraw``), and the end (``finished``, or
   ``paused`` after ``pause``), and obeys ``pause``, ``cancel`` and ``answer``.

States run in the runner's own embedded supervisor (process isolation by default), in
attempt cgroups it creates below the job's. If agentd goes away the runner exits at
once; the kernel kills it anyway (its parent-death signal), and the next agentd resumes
the job from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import signal
import socket
import sys
import traceback
from typing import Any

from ..errors import AgentError, DaemonProtocolError
from ..events import RUN_STARTED
from ..human import HumanInputRequest
from ..runtime import main_module
from ..values import WORKFLOW_MODULE
from .protocol import Link
from .remote import RemotePool, install

RUNNER_FD_ENV = "AGENT_RUNNER_FD"
EXIT_OK, EXIT_FAILED, EXIT_LOST = 0, 1, 75


class DaemonInputProvider:
    """Human input under agentd: questions go to agentd, answers come from ``agentctl respond``."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._waiting: dict[str, asyncio.Future[str]] = {}

    async def ask(self, request: HumanInputRequest) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[request.id] = future
        self._send({"op": "ask", "request": request.to_dict()})
        try:
            return await future
        finally:
            if self._waiting.get(request.id) is future:
                del self._waiting[request.id]
            if not future.done() or future.cancelled():
                self._send({"op": "withdraw", "id": request.id})

    def answer(self, request_id: str, text: str) -> None:
        future = self._waiting.get(request_id)
        if future is not None and not future.done():
            future.set_result(text)


class Runner:
    """The job's side of the conversation with agentd (see the module docstring)."""

    def __init__(self, link: Link, job: dict[str, Any]) -> None:
        self.job = job
        self.link = link
        self.pool = RemotePool(job, on_other=self.on_message, on_lost=self.on_lost)
        self.pool.adopt(link)
        install(self.pool)
        self.agent: Any = None
        self.human = DaemonInputProvider(link.send)
        self.task: asyncio.Task[Any] | None = None
        self.requested: str | None = None  # "pause" or "cancel", once agentd asked
        self._dirty: set[str] = set()
        self._flushing = False

    # --- from agentd -----------------------------------------------------------------

    def on_message(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "answer":
            self.human.answer(str(message.get("id")), str(message.get("text")))
        elif op in ("pause", "cancel") and self.requested is None:
            self.requested = op
            if self.agent is not None and self.task is not None:
                asyncio.ensure_future(self._pause() if op == "pause" else self.agent.cancel_all())

    def on_lost(self, why: str) -> None:
        print(f"agent runner: lost agentd ({why}); exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST)

    async def _pause(self) -> None:
        await self.agent.pause()  # stops the running states; the checkpoint is saved
        self._flush()
        self.link.send({"op": "paused"})
        if self.task is not None:
            self.task.cancel()

    # --- to agentd ---------------------------------------------------------------------

    def observe(self, event: Any) -> None:
        if event.kind == RUN_STARTED:
            self.link.send({"op": "started", "run_id": event.run_id, "states": self.statuses()})
        elif event.state is not None:
            self._dirty.add(event.state)
            if not self._flushing:
                self._flushing = True
                asyncio.get_running_loop().call_soon(self._flush)

    def statuses(self, names: Any = None) -> dict[str, str]:
        meta = self.agent.state_metadata
        return {n: meta[n].status.value for n in (meta if names is None else names) if n in meta}

    def _flush(self) -> None:
        self._flushing = False
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            self.link.send({"op": "states", "states": self.statuses(dirty)})

    def finish(self, status: str, error: str | None = None) -> None:
        if self.agent is not None:
            self._flush()
            self.link.send({"op": "states", "states": self.statuses()})
        self.link.send({"op": "finished", "status": status, "error": error})

    # --- the job -----------------------------------------------------------------------

    async def load(self) -> Any:
        """Execute the submitted source and return its Agent (raises LookupError when there is none).

        As ``agent run`` takes it: top-level ``await`` is allowed, and a module-level
        statement that only starts a run of the agent (``await agent.run()``,
        ``agent.run_sync()``) is left out, since this runner runs the agent itself.
        """
        import ast
        import inspect

        from ..agent import Agent
        from ..cli.workflow import without_its_runs

        path = str(self.job.get("path") or "workflow.py")
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        main_module.note_workflow(path)  # its states' tracebacks name it
        namespace: dict[str, Any] = {"__name__": WORKFLOW_MODULE, "__file__": path, "__builtins__": builtins}
        top_level_await = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        tree = compile(self.job["source"], path, "exec", flags=ast.PyCF_ONLY_AST | top_level_await, dont_inherit=True)
        code = compile(without_its_runs(tree), path, "exec", flags=top_level_await, dont_inherit=True)
        if code.co_flags & inspect.CO_COROUTINE:
            await eval(code, namespace)  # noqa: S307 - as the job's user, never as root
        else:
            exec(code, namespace)  # noqa: S102 - as the job's user, never as root
        agents = {k: v for k, v in namespace.items() if isinstance(v, Agent)}
        if not agents:
            raise LookupError(f"{path} defines no Agent at module level: assign one, e.g. agent = Agent(\"my_flow\")")
        if len(agents) > 1 and "agent" not in agents:
            raise LookupError(f"{path} defines several agents ({', '.join(sorted(agents))}): name the one "
                              "to run `agent`")
        return agents.get("agent") or next(iter(agents.values()))

    def fork_zygote(self) -> None:
        """Fork the job's state zygote from this process, now that the workflow is loaded.

        The supervisor adopts it (``AGENT_ZYGOTE``) instead of starting a fresh
        interpreter, which took most of the time to a job's first isolated state (about
        50 ms instead of 150-350 ms here), and every state process inherits what the
        workflow file imported. Only while this process has one thread (a module that
        started threads at import makes forking unsafe: the supervisor then starts its
        zygote the usual way), and not on cgroup v2, where it would sit in the job's
        cgroup, which must hold no process once the supervisor hands controllers below it.
        """
        if len(os.listdir("/proc/self/task")) != 1:
            return
        from ..runtime import zygote
        from ..supervisor.launcher import PRESTARTED_ENV

        theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        runner = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                asyncio.events._set_running_loop(None)  # the runner's loop is not this process's
                signal.set_wakeup_fd(-1)  # nor its signal pipe (uvloop would restore it)
                keep = theirs.fileno()
                # Objects of this process that own descriptors (the event loop's, sockets')
                # live on in the fork and close "their" numbers when collected. Pointing
                # every inherited number at /dev/null, instead of closing it, keeps those
                # numbers taken until then: the zygote's own descriptors (the memfds that
                # carry children's specs) can never be closed from under it.
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                for name in os.listdir("/proc/self/fd"):
                    fd = int(name)
                    if fd > 2 and fd not in (keep, null):
                        try:
                            os.dup2(null, fd, inheritable=False)
                        except OSError:
                            pass  # the directory's own descriptor, closed by now
                os.setsid()
                code = zygote.main(["zygote", str(keep), str(runner)])
            finally:
                os._exit(code)
        theirs.close()
        os.environ[PRESTARTED_ENV] = f"{ours.detach()}:{pid}"

    def start_supervisor(self) -> None:
        """Start the embedded supervisor now rather than at the first isolated state's launch.

        Its zygote (forked above, or a fresh interpreter) then warms up, on the other
        core, while this process opens the checkpoint store and starts the run. A
        supervisor that cannot start is left for that launch to report, as it would
        have been: the attempt fails there with the supervisor's own error.
        """
        from ..supervisor.service import get_supervisor

        try:
            get_supervisor()
        except Exception:  # noqa: BLE001 - raised again, in its place, by the first launch
            pass

    async def run(self) -> int:
        try:
            agent = self.agent = await self.load()
            agent.resource_pool = self.pool  # a job's states are admitted by the box, always
            for name, spec in agent.states.items():
                if spec.resources is not None:
                    self.pool.check_request(spec.resources, name)
            _check_sandbox_allowed(agent)
        except BaseException as exc:  # the workflow's top-level code may raise anything
            traceback.print_exc()
            self.finish("failed", f"cannot load the workflow: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        if self.job.get("fork_zygote") and _isolated(agent):
            self.fork_zygote()
        if _supervised(agent):
            self.start_supervisor()
        from ..checkpoint_store import open_default_store

        store = agent.checkpoint_store = open_default_store()
        if agent.human_input is None:
            agent.human_input = self.human
        agent.add_observer(self.observe)
        if self.requested is not None:  # agentd asked before anything ran
            self.link.send({"op": "paused"} if self.requested == "pause" else {"op": "finished", "status": "cancelled"})
            return EXIT_OK
        runs = store.list_runs()
        if runs and runs[0].status == "cancelled":  # cancelled just before agentd went away
            self.finish("cancelled")
            return EXIT_OK
        if runs:
            self.task = asyncio.ensure_future(agent.resume_run(runs[0].run_id, store))
        else:
            self.task = asyncio.ensure_future(agent.run(initial_context=self.job.get("params") or {}))
        try:
            await self.task
        except asyncio.CancelledError:
            if self.requested == "pause":
                return EXIT_OK
            raise
        except AgentError as exc:
            self.finish("failed", str(exc))
            return EXIT_FAILED
        except Exception as exc:
            traceback.print_exc()
            self.finish("failed", f"{type(exc).__name__}: {exc}")
            return EXIT_FAILED
        status = agent.status.value
        self.finish(status if status in ("completed", "cancelled") else "failed", None)
        return EXIT_OK


def _supervised(agent: Any) -> bool:
    """Whether any state of ``agent`` runs under the embedded supervisor (a process of its own, or a worker)."""
    from ..executor import Isolation

    supervised = (Isolation.PROCESS, Isolation.SANDBOX, Isolation.WORKER)
    return any((spec.isolation or agent.isolation) in supervised for spec in agent.states.values())


def _check_sandbox_allowed(agent: Any) -> None:
    """Refuse, as the job loads, a sandboxed state that could never start: leasing a uid
    needs root, and a user's job runs as its user (else the states before it would run,
    and their human answers be given, for nothing)."""
    from ..errors import IsolationUnavailableError
    from ..executor import Isolation

    if os.geteuid() == 0:
        return
    sandboxed = [name for name, spec in agent.states.items()
                 if (spec.isolation or agent.isolation) is Isolation.SANDBOX]
    if sandboxed:
        raise IsolationUnavailableError(
            f"state {sandboxed[0]!r} uses isolation='sandbox', which agentd runs only in root's jobs (it leases "
            "uids): this job runs as its user; use 'process' or 'worker', or have root submit it"
        )


def _isolated(agent: Any) -> bool:
    """Whether any state of ``agent`` runs in a process of its own."""
    from ..executor import Isolation

    return any((spec.isolation or agent.isolation) is not Isolation.INLINE for spec in agent.states.values())


async def _main(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[dict[str, Any]] = loop.create_future()
    early: list[dict[str, Any]] = []

    def receive(message: dict[str, Any]) -> None:
        if first.done():
            early.append(message)
        elif message["op"] != "job":
            first.set_exception(DaemonProtocolError(f"a runner's first message must be 'job', not {message['op']!r}"))
        else:
            first.set_result(message)

    def lost(why: str) -> None:
        if not first.done():
            first.set_exception(DaemonProtocolError(f"agentd closed the connection before sending the job ({why})"))

    link = Link(sock, loop, receive, lost)
    runner = Runner(link, await first)
    for message in early:
        runner.pool.dispatch(message)
    try:
        return await runner.run()
    finally:
        from ..supervisor import shutdown_supervisor

        shutdown_supervisor()


def main(fd: int | None = None) -> int:
    """Run the job whose agentd connection is ``fd`` (default ``$AGENT_RUNNER_FD``)."""
    import uvloop

    if fd is None:
        fd = int(os.environ[RUNNER_FD_ENV])
    return int(uvloop.run(_main(socket.socket(fileno=fd))))
