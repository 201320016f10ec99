"""The process and worker executors: context in and out, human input, logs, cancellation, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass

import psutil
import pytest

from agent.context import Context, TypedContextData
from agent.errors import AttemptLogNotFoundError, HumanInputTimeoutError, IsolationError, UnencodableValueError
from agent.executor import AttemptFailed, Isolation
from agent.supervisor import current_supervisor, get_executor, read_attempt_log, service, shutdown_supervisor
from agent.supervisor.child import ChildProcess

from .helpers import make_attempt, run, state_process_gone

pytestmark = pytest.mark.usefixtures("level")


@dataclass
class Progress(TypedContextData):
    done: int
    names: list[str]


async def context_state(context):
    seen = (context.get_state("given"), context.get_typed("typed", Progress))
    for i in range(50):
        context.set_state("counter", i)
    context.remove_state("doomed")
    context.update_typed("typed", done=seen[1].done + 1)
    context.set_state("seen", seen)
    return ["next_a", "next_b"]


async def imports_a_typed_class_state(context):
    import importlib

    context.set_typed("lazy", importlib.import_module(context.get_state("module")).Lazy(1))


async def human_state(context):
    score = await context.human_in_the_loop(
        prompt="Enter score (0-100):", timeout=30,
        validator=lambda x: x.isdigit() and 0 <= int(x) <= 100,
    )
    return int(score)


async def human_timeout_state(context):
    try:
        await context.human_in_the_loop(prompt="anyone?", timeout=1)
    except HumanInputTimeoutError as exc:
        return f"timeout: {exc}"
    return "answered"


async def printing_state(context):
    print("to stdout from the state")
    print("to stderr from the state", file=sys.stderr)
    return None


async def pid_then_wait_state(context):
    context.set_state("progress", 1)
    context.set_state("pid", os.getpid())
    await asyncio.get_running_loop().create_future()


async def write_then_signal_state(context):
    context.set_state("progress", 1)
    context.set_state("pid", os.getpid())
    with open(context.get_state("fifo"), "w") as fifo:
        fifo.write("written\n")
    await asyncio.get_running_loop().create_future()


async def environment_state(context):
    import threading

    return {"pid": os.getpid(), "ppid": os.getppid(), "threads": threading.active_count(),
            "pgid": os.getpgid(0), "loop": type(asyncio.get_running_loop()).__module__,
            "argv": sys.argv, "path": sys.path}


async def random_state(context):
    import random
    import secrets

    return [random.random(), secrets.token_hex(8)]


async def threads_state(context):
    import threading

    main = threading.current_thread()
    results = []
    worker = threading.Thread(target=lambda: results.append(threading.get_native_id()))
    worker.start()
    worker.join()
    return {"is_main": main is threading.main_thread(), "native_id": main.native_id,
            "tid": threading.get_native_id(), "worker_tid": results[0],
            "to_thread": await asyncio.to_thread(lambda: 6 * 7)}


async def big_values_state(context):
    blob = context.get_state("blob")
    context.set_state("echo", blob[::-1])
    return len(blob)


async def many_writes_state(context):
    for i in range(20_000):
        context.set_state(f"k{i % 100}", f"{i:05d}" + "x" * 1000)
    return "done"


async def writes_started(func):
    started = asyncio.Event()
    ctx = Context(on_write=lambda key, value, deleted: key == "pid" and started.set())
    attempt = make_attempt(func, context=ctx)
    task = asyncio.ensure_future(run(attempt))
    await started.wait()
    return attempt, task


class TestContextAcrossTheBoundary:
    """The child starts from a snapshot; its writes arrive in order and are applied."""

    async def test_snapshot_in_writes_out(self):
        ctx = Context({"given": {"a": (1, 2)}, "doomed": 1, "typed": Progress(1, ["x"])})
        seen_order = []
        ctx._on_write = lambda key, value, deleted: key == "counter" and seen_order.append(value)
        outcome = await run(make_attempt(context_state, context=ctx))
        assert outcome.result == ["next_a", "next_b"]
        assert seen_order == list(range(50))
        assert ctx.get_state("counter") == 49 and "doomed" not in ctx
        assert ctx.get_typed("typed", Progress) == Progress(2, ["x"])
        assert ctx.get_state("seen") == ({"a": (1, 2)}, Progress(1, ["x"]))

    async def test_big_values_both_ways(self):
        blob = os.urandom(24 * 1024 * 1024)
        ctx = Context({"blob": blob}, budget=56 * 1024 * 1024)  # both copies fit
        outcome = await run(make_attempt(big_values_state, context=ctx))
        assert outcome.result == len(blob)
        assert ctx.get_state("echo") == blob[::-1]

    async def test_thousands_of_writes_then_the_result_all_arrive(self):
        # Far past libzmq's high-water mark: the child's exit must not lose the tail.
        ctx = Context()
        seen = []
        ctx._on_write = lambda key, value, deleted: seen.append(value[:5])
        outcome = await run(make_attempt(many_writes_state, context=ctx))
        assert outcome.result == "done"
        assert seen == [f"{i:05d}" for i in range(20_000)]

    async def test_a_typed_class_only_the_state_imports(self, level, tmp_path, monkeypatch):
        # As inline: the supervisor imports the class's module to decode the write (trusted
        # code; a sandboxed child's data is never decoded by importing).
        module = f"typed_only_the_state_imports_{level.value}"
        (tmp_path / f"{module}.py").write_text(
            "from dataclasses import dataclass\n"
            "from agent import TypedContextData\n"
            "@dataclass\n"
            "class Lazy(TypedContextData):\n"
            "    x: int\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, module, raising=False)
        ctx = Context({"module": module})
        outcome = await run(make_attempt(imports_a_typed_class_state, context=ctx))
        assert outcome.result is None
        assert module in sys.modules
        assert ctx.get_typed("lazy", sys.modules[module].Lazy).x == 1

    async def test_a_value_outside_the_model_never_enters_the_context(self):
        with pytest.raises(UnencodableValueError, match="context key 'lock': a asyncio.locks.Lock cannot"):
            Context({"lock": asyncio.Lock(), "given": 1})


class TestWhatCannotTravel:
    """A state whose code uses a value that cannot be copied into a process is told which one."""

    async def test_the_value_is_named(self):
        lock = threading.Lock()

        async def uses_a_lock(context):
            with lock:
                return None

        with pytest.raises(IsolationError, match=r"it uses 'lock' \(of type lock\).*isolation='inline'"):
            await run(make_attempt(uses_a_lock))


class TestChildEnvironment:
    """The state's process is a fork of the zygote, in its own process group, on uvloop."""

    async def test_forked_from_the_zygote(self):
        outcome = await run(make_attempt(environment_state))
        info = outcome.result
        assert info["ppid"] == current_supervisor().zygote.pid
        assert info["pgid"] == info["pid"]
        assert info["loop"].startswith("uvloop")
        # What the caller's process has, not the zygote's.
        assert info["argv"] == sys.argv and info["path"] == sys.path

    async def test_a_long_sys_path_reaches_the_state_whole(self, monkeypatch: pytest.MonkeyPatch):
        # The spec carries sys.path: here many pages of it.
        long_path = [*sys.path, *(f"/nonexistent/{'d' * 60}/{i}" for i in range(400))]
        monkeypatch.setattr(sys, "path", long_path)
        info = (await run(make_attempt(environment_state))).result
        assert info["path"] == long_path

    async def test_children_draw_different_random_numbers(self):
        # The zygote forks without os.fork: the reseed its at-fork hook did is done by hand.
        first = (await run(make_attempt(random_state))).result
        second = (await run(make_attempt(random_state))).result
        assert first[0] != second[0] and first[1] != second[1]

    async def test_threads_work_in_the_child(self):
        info = (await run(make_attempt(threads_state))).result
        assert info["is_main"]
        assert info["native_id"] == info["tid"] != info["worker_tid"]
        assert info["to_thread"] == 42


class TestHumanInput:
    """Requests go to the supervisor's provider; the validator runs in the child."""

    async def test_validator_reasks_until_valid(self):
        answers = iter(["abc", "150", "42"])
        calls = []

        async def provider(*, prompt, timeout, validator, default):
            calls.append((prompt, validator, default))
            return next(answers)

        outcome = await run(make_attempt(human_state, context=Context(human_input=provider)))
        assert outcome.result == 42
        assert len(calls) == 3
        assert all(c == ("Enter score (0-100):", None, None) for c in calls)

    async def test_provider_error_is_raised_in_the_child(self):
        async def provider(*, prompt, timeout, validator, default):
            raise HumanInputTimeoutError("nobody answered")

        outcome = await run(make_attempt(human_timeout_state, context=Context(human_input=provider)))
        assert outcome.result == "timeout: nobody answered"


class TestLogs:
    """A child's stdout and stderr are kept per run, state and attempt."""

    async def test_log_is_retrievable(self):
        attempt = make_attempt(printing_state, state="printer", number=2)
        await run(attempt)
        text = read_attempt_log(attempt.run_id, "printer", 2)
        assert "to stdout from the state" in text and "to stderr from the state" in text

    async def test_missing_log_is_a_typed_error(self):
        await run(make_attempt(printing_state))
        with pytest.raises(AttemptLogNotFoundError, match="no log for run"):
            read_attempt_log("no-such-run", "printer", 1)


class TestPreemptAndCancel:
    """Stopping keeps the writes made so far; the process goes (a worker serves on)."""

    async def test_preempt_keeps_writes(self):
        attempt, task = await writes_started(pid_then_wait_state)
        attempt.stop_reason = "preempt"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert attempt.context.get_state("progress") == 1
        assert state_process_gone(attempt.context.get_state("pid"))

    async def test_preempted_before_its_hello_was_read_it_keeps_its_writes(self, level, tmp_path):
        # A child runs its state without waiting for the supervisor: on a busy supervisor its
        # hello and writes may still wait unread when it is preempted. They are read first,
        # so the state is asked to stop, not killed, and its progress is kept (a killed
        # one lost it, and its retry started from nothing).
        if level is Isolation.WORKER:
            pytest.skip("a worker's channel is its own, read before it is handed an attempt")
        fifo = tmp_path / "written"
        os.mkfifo(fifo)
        await run(make_attempt(printing_state))
        sup = current_supervisor()
        loop = asyncio.get_running_loop()
        attempt = make_attempt(write_then_signal_state, context=Context({"fifo": str(fifo)}))
        task = asyncio.ensure_future(run(attempt))
        await asyncio.sleep(0)  # launched: it waits for its answer
        sup.router.detach()  # from now on the loop reads nothing the child sends: a busy supervisor
        try:
            assert await loop.run_in_executor(None, lambda: fifo.open().readline()) == "written\n"
            attempt.stop_reason = "preempt"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            sup.router.attach(loop)
        assert attempt.context.get_state("progress") == 1
        assert state_process_gone(attempt.context.get_state("pid"))


class TestSupervisorLifetime:
    """The supervisor is shared and warm, and comes back after its zygote dies."""

    async def test_a_child_leaves_by_itself_once_it_reported(self, monkeypatch):
        # Its run came with its spec: it waits only for the supervisor's welcome of its hello,
        # then exits; one that lingered would be killed after the grace period.
        kills = []
        original = ChildProcess.kill
        monkeypatch.setattr(ChildProcess, "kill", lambda child: (kills.append(child.pid), original(child)))
        for _ in range(3):
            assert (await run(make_attempt(printing_state))).result is None
        assert kills == []

    async def test_shared_and_warm(self):
        await run(make_attempt(printing_state))
        sup = current_supervisor()
        await run(make_attempt(printing_state))
        assert current_supervisor() is sup
        assert get_executor(Isolation.PROCESS) is get_executor(Isolation.PROCESS)

    async def test_warm_zygote_holds_one_thread_and_only_its_control_socket(self):
        # Its warm-up served whole attempts in-process: none of that may be left open.
        await run(make_attempt(printing_state))
        zygote = psutil.Process(current_supervisor().zygote.pid)
        assert zygote.num_threads() == 1
        # (Datagram sockets carry sandboxes' seccomp listeners, made at the first sandbox.)
        sockets = [c for c in zygote.net_connections(kind="unix") if c.type == socket.SOCK_STREAM]
        assert len(sockets) == 1, sockets

    async def test_zygote_death_fails_attempts_and_restarts(self):
        attempt, task = await writes_started(pid_then_wait_state)
        old = current_supervisor()
        child = psutil.Process(attempt.context.get_state("pid"))
        os.kill(old.zygote.pid, signal.SIGKILL)
        with pytest.raises(AttemptFailed) as info:
            await task
        assert info.value.reason.kind == "lost_connection"
        child.wait(timeout=10)  # killed by its parent-death signal, reaped by init
        assert old.closed and not os.path.exists(old.ipc_dir)
        outcome = await run(make_attempt(environment_state))
        assert current_supervisor() is not old
        assert outcome.result["ppid"] == current_supervisor().zygote.pid

    async def test_shutting_down_fails_the_attempts_still_running_and_says_why(self):
        attempt, task = await writes_started(pid_then_wait_state)
        child = psutil.Process(attempt.context.get_state("pid"))
        shutdown_supervisor()
        with pytest.raises(AttemptFailed) as info:
            await asyncio.wait_for(task, 30)  # not left waiting for a process that is gone
        assert "supervisor shut down" in info.value.reason.message
        child.wait(timeout=10)


class TestEventLoops:
    """The shared supervisor follows the caller's loop, one loop at a time."""

    async def test_a_second_loop_with_live_children_gets_a_supervisor_of_its_own(self):
        started = threading.Event()
        box: dict = {}

        def other_loop() -> None:
            async def main() -> None:
                ctx = Context(on_write=lambda key, value, deleted: started.set())
                box["loop"] = asyncio.get_running_loop()
                box["task"] = asyncio.ensure_future(run(make_attempt(pid_then_wait_state, context=ctx)))
                try:
                    await box["task"]
                except asyncio.CancelledError:
                    pass

            asyncio.run(main())

        thread = threading.Thread(target=other_loop)
        thread.start()
        try:
            assert started.wait(timeout=30)
            busy = current_supervisor()  # it serves the other thread's loop, which still runs
            outcome = await run(make_attempt(printing_state))
            assert outcome.result is None
            assert busy.router.loop is box["loop"] and service._others
            mine = service._others[0]
            assert mine.router.loop is asyncio.get_running_loop() and mine.zygote.pid != busy.zygote.pid
        finally:
            box["loop"].call_soon_threadsafe(box["task"].cancel)
            thread.join()
        await run(make_attempt(printing_state))  # this loop keeps its own
        assert service._others == [mine] and mine.router.loop is asyncio.get_running_loop()
        shutdown_supervisor()  # both go, with everything they started
        assert not psutil.pid_exists(mine.zygote.pid) and not os.path.exists(mine.ipc_dir)

    async def test_a_supervisor_started_on_a_thread_outlives_the_thread(self):
        # Its zygote watches the process, not the thread that started it: a run on a
        # worker thread of an application must not take the children of later runs along.
        shutdown_supervisor()
        box: dict = {}

        def on_a_thread() -> None:
            box["ppid"] = asyncio.run(run(make_attempt(environment_state))).result["ppid"]

        thread = threading.Thread(target=on_a_thread)
        thread.start()
        thread.join()
        zygote = current_supervisor().zygote.pid
        assert box["ppid"] == zygote
        for _ in range(2):
            assert (await run(make_attempt(environment_state))).result["ppid"] == zygote
        assert current_supervisor().zygote.pid == zygote and psutil.pid_exists(zygote)
