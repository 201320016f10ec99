"""``isolation="worker"``: workers are sized to their shape, replaced when they die, retired
without leftovers, and a worker's state can do no more on its channel than a child can."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from agent import Agent, DependencyType, ResourcePool, ResourceRequirements
from agent.errors import StateFailedError
from agent.ipc import Hello, encode_message
from agent.ipc.zmtp import DealerTransport
from agent.supervisor import current_supervisor, shutdown_supervisor
from agent.supervisor.workers import WorkerSettings

from .helpers import files_under

ROOT = str(Path(__file__).resolve().parents[2])

MiB = 1 << 20


def _cgroup_dir(controller: str) -> str:
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, names, path = line.strip().split(":", 2)
            if controller in names.split(","):
                return f"/sys/fs/cgroup/{names}{path}"
            if not names:  # cgroup v2: one hierarchy
                return f"/sys/fs/cgroup{path}"
    raise LookupError(controller)


async def report_limits(context):
    with open(os.path.join(_cgroup_dir("memory"), "memory.limit_in_bytes")) as fh:
        context.set_state("memory_limit", int(fh.read()))
    with open(os.path.join(_cgroup_dir("cpu"), "cpu.cfs_quota_us")) as fh:
        context.set_state("cpu_quota", int(fh.read()))
    context.set_state("pid", os.getpid())


async def crash_first(context):
    context.set_state(f"pid_{context.attempt}", os.getpid())
    if context.attempt == 1:
        os._exit(3)


async def hog(context):
    context.set_state("hog_pid", os.getpid())
    block = bytearray(200 * MiB)
    block[:: 4096] = b"x" * len(block[:: 4096])


async def record_pid(context):
    context.set_state(f"pid_{context.state_name}", os.getpid())


async def chain_step(context):
    """One of s0..s4: records its process and goes on to the next."""
    context.set_state(f"pid_{context.state_name}", os.getpid())
    context.set_state(f"cgroup_{context.state_name}", _cgroup_dir("memory"))
    step = int(context.state_name[1:])
    return f"s{step + 1}" if step < 4 else None


async def forge_ready(context):
    """Say ready (a hello) on the worker's channel while the state still runs."""
    context.set_state("forger", os.getpid())
    transport = next(o for o in gc.get_objects() if isinstance(o, DealerTransport) and o._sock.fileno() >= 0)
    transport.send(encode_message(Hello(pid=os.getpid(), secret=b"")))
    await asyncio.sleep(30)  # it would run on while its worker looked free


async def spawn_daemon(context):
    """Start a process that is no longer the worker's child (double fork, new session)."""
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(write, str(os.getpid()).encode())
            os.close(write)
            os.execvp("sleep", ["sleep", "600"])
        os._exit(0)
    os.close(write)
    context.set_state("daemon", int(os.read(read, 32)))
    os.close(read)
    os.waitpid(middle, 0)
    context.set_state("pid", os.getpid())
    context.set_state("cgroup", _cgroup_dir("memory"))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def cgroup_v1() -> bool:
    return os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes")


@pytest.mark.skipif(not cgroup_v1(), reason="reads cgroup v1 files")
async def test_a_workers_cgroup_is_sized_to_its_shape():
    agent = Agent("shape", isolation="worker")
    agent.add_state("limits", report_limits, resources=ResourceRequirements(cpu_units=0.5, memory_mb=96))
    ctx = await agent.run()
    assert ctx.get_state("memory_limit") == 96 * MiB
    assert ctx.get_state("cpu_quota") == 50_000  # half of the 100 ms period
    assert ctx.get_state("pid") in current_supervisor().workers.idle_pids()


@pytest.mark.skipif(not cgroup_v1(), reason="reads cgroup v1 files")
@pytest.mark.parametrize("isolation", ["process", "worker"])
async def test_a_request_past_what_a_cgroup_can_say_runs_with_its_most(isolation):
    # cpu_units=1e20 is a quota the kernel refuses (every attempt failed with EINVAL), and
    # 1e200 MiB a limit it cut to 64 bits without a word: both are no limit at all.
    agent = Agent("huge", isolation=isolation,
                  resource_pool=ResourcePool(total_cpu=1e30, total_memory=1e300))
    agent.add_state("limits", report_limits, resources=ResourceRequirements(cpu_units=1e20, memory_mb=1e200),
                    max_retries=0)
    ctx = await agent.run()
    assert ctx.get_state("cpu_quota") == (1 << 44) - 1
    assert ctx.get_state("memory_limit") == (1 << 63) - 4096


async def raises_its_limits(context):
    with open(os.path.join(_cgroup_dir("cpu"), "cpu.cfs_quota_us"), "w") as fh:
        fh.write("-1")  # root may: a worker must not carry it to the next state
    with open(os.path.join(_cgroup_dir("pids"), "pids.max"), "w") as fh:
        fh.write("max")
    context.set_state("raised_pid", os.getpid())
    return "limits"


@pytest.mark.skipif(not cgroup_v1(), reason="writes cgroup v1 files")
async def test_a_state_that_raised_its_limits_leaves_them_to_no_other_state():
    shape = ResourceRequirements(cpu_units=0.5, memory_mb=96, pids_max=20)
    agent = Agent("raiser", isolation="worker")
    agent.add_state("raises", raises_its_limits, resources=shape)
    agent.add_state("limits", report_limits, resources=shape)
    ctx = await agent.run()
    assert ctx.get_state("cpu_quota") == 50_000 and ctx.get_state("memory_limit") == 96 * MiB
    assert ctx.get_state("pid") != ctx.get_state("raised_pid")  # the worker it left was retired
    await until(lambda: gone(ctx.get_state("raised_pid")))


async def rewrites_a_setting(context):
    controller, name, value = context.get_state("setting")
    with open(os.path.join(_cgroup_dir(controller), name), "w") as fh:
        fh.write(value)
    context.set_state("rewrote_pid", os.getpid())
    return "reads"


async def reads_the_setting(context):
    controller, name, _ = context.get_state("setting")
    with open(os.path.join(_cgroup_dir(controller), name)) as fh:
        context.set_state("seen", fh.read().splitlines()[0])
    context.set_state("pid", os.getpid())


@pytest.mark.skipif(not cgroup_v1(), reason="writes cgroup v1 files")
@pytest.mark.parametrize("setting", [("memory", "memory.oom_control", "1"), ("cpu", "cpu.shares", "2"),
                                     ("memory", "memory.soft_limit_in_bytes", "4096"),
                                     ("memory", "memory.kmem.tcp.limit_in_bytes", "1048576")])
async def test_a_cgroup_setting_a_state_rewrote_reaches_no_other_state(setting):
    # oom_kill_disable left set would hang the next state that passes its memory limit.
    controller, name, _ = setting
    if not os.path.exists(os.path.join(_cgroup_dir(controller), name)):
        pytest.skip(f"this kernel has no {name}")
    fresh = Agent("fresh_setting", isolation="process")
    fresh.add_state("reads", reads_the_setting)
    expected = (await fresh.run(initial_context={"setting": list(setting)})).get_state("seen")
    agent = Agent("rewriter", isolation="worker")
    agent.add_state("rewrites", rewrites_a_setting)
    agent.add_state("reads", reads_the_setting)
    ctx = await agent.run(initial_context={"setting": list(setting)})
    assert ctx.get_state("seen") == expected
    assert ctx.get_state("pid") != ctx.get_state("rewrote_pid")  # the worker it left was retired


async def test_a_worker_that_dies_is_replaced_and_the_state_retried():
    agent = Agent("crash", isolation="worker")
    agent.add_state("crash_first", crash_first, max_retries=1)
    ctx = await agent.run()
    first, second = ctx.get_state("pid_1"), ctx.get_state("pid_2")
    assert first != second
    assert second in current_supervisor().workers.idle_pids()


async def test_a_worker_killed_by_its_memory_limit_is_replaced():
    agent = Agent("oom", isolation="worker")
    need = ResourceRequirements(memory_mb=64)
    agent.add_state("hog", hog, resources=need)
    with pytest.raises(StateFailedError) as info:
        await agent.run()
    assert info.value.reason.kind == "limit" and "memory limit 64 MiB" in str(info.value)
    hog_pid = agent.context.get_state("hog_pid")
    after = Agent("after", isolation="worker")
    after.add_state("next", record_pid, resources=need)  # the same shape: a new worker serves it
    ctx = await after.run()
    assert ctx.get_state("pid_next") != hog_pid
    assert hog_pid not in current_supervisor().workers.idle_pids()


async def test_a_worker_killed_by_its_memory_limit_as_it_starts_fails_its_attempt_with_that_limit():
    # 1 MiB is less than a worker needs to start: the kernel's OOM killer takes it before
    # its hello, or between its hello and its attempt. Either way the attempt failed for
    # that limit (permanent, as a process child's would), not for a signal from outside.
    for i in range(6):  # the kill comes at different moments (not at all in some runs)
        agent = Agent(f"oom_at_start_{i}", isolation="worker")
        agent.add_state("tiny", record_pid, resources=ResourceRequirements(cpu_units=0.5, memory_mb=1), max_retries=1)
        try:
            await agent.run()
        except StateFailedError as exc:
            assert (exc.reason.kind, exc.reason.permanent, exc.attempts) == ("limit", True, 1), exc.reason
            assert "memory limit 1 MiB" in exc.reason.message


async def hog_in_a_subprocess(context):
    context.set_state("hog_pid", os.getpid())
    done = subprocess.run([sys.executable, "-c", "b = [bytearray(1 << 20) for _ in range(400)]"], check=False)
    raise RuntimeError(f"the subprocess ended with {done.returncode}")


async def test_a_memory_kill_of_a_fresh_workers_subprocess_is_the_states_own_and_retires_the_worker():
    # The worker itself lives on, and had served no earlier state: the failure is the
    # state's own (not retried), and the worker does not serve again.
    agent = Agent("oom_child", isolation="worker")
    need = ResourceRequirements(memory_mb=64)
    agent.add_state("hog", hog_in_a_subprocess, resources=need, max_retries=2)
    with pytest.raises(StateFailedError) as info:
        await agent.run()
    assert (info.value.attempts, info.value.reason.kind, info.value.reason.permanent) == (1, "limit", True)
    assert "earlier state" not in info.value.reason.message
    hog_pid = agent.context.get_state("hog_pid")
    after = Agent("after_oom_child", isolation="worker")
    after.add_state("next", record_pid, resources=need)
    assert (await after.run()).get_state("pid_next") != hog_pid


CUT_SHORT = """
import asyncio
from agent import Agent, DependencyType, ResourcePool, ResourceRequirements
from agent.errors import RunTimeoutError

async def nap(context):
    await asyncio.sleep(0.05)

for i in range(20):
    agent = Agent(f"cut{i}", isolation="worker")
    agent.add_state("nap", nap, resources=ResourceRequirements(cpu_units=0.5, memory_mb=64 + i))  # a new worker each
    try:
        agent.run_sync(timeout=0.01 + 0.005 * (i % 5))
    except RunTimeoutError:
        pass
print("done")
"""


def test_a_worker_whose_run_ended_while_it_started_goes_quietly(tmp_path):
    # Its cgroup is removed with the run's, often before the new worker joins it: it
    # exits, and says nothing on the program's stderr (a traceback there before).
    script = tmp_path / "cut_short.py"
    script.write_text(CUT_SHORT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT}, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert done.stderr == ""


async def test_a_process_a_state_left_in_its_workers_cgroup_does_not_outlive_the_attempt():
    # Not the worker's child, so only its cgroup tells: the worker goes instead of
    # serving again, and the process goes with the worker's cgroup before run() returns.
    agent = Agent("daemon", isolation="worker")
    agent.add_state("spawn", spawn_daemon)
    ctx = await agent.run()
    daemon, worker = ctx.get_state("daemon"), ctx.get_state("pid")
    assert gone(daemon)
    assert not os.path.exists(ctx.get_state("cgroup"))
    assert worker not in current_supervisor().workers.idle_pids()
    after = Agent("after_daemon", isolation="worker")
    after.add_state("next", record_pid)
    assert (await after.run()).get_state("pid_next") != worker


async def test_retired_workers_leave_no_process_or_cgroup():
    sup = current_supervisor()
    if sup is None:
        warm = Agent("warm", isolation="worker")
        warm.add_state("s0", record_pid)
        await warm.run()
        sup = current_supervisor()
    sup.workers._settings = WorkerSettings(max_states=2)
    try:
        agent = Agent("retire", isolation="worker")
        names = [f"s{i}" for i in range(5)]
        for name in names:
            agent.add_state(name, chain_step)
        ctx = await agent.run()
    finally:
        sup.workers._settings = None
    pids = [ctx.get_state(f"pid_{name}") for name in names]
    assert all(pids.count(pid) <= 2 for pid in pids), pids  # each worker served two states at most
    retired = {pid for pid in pids if pids.count(pid) == 2}
    assert retired
    # Retiring kills a worker; its exit report then removes its cgroup on the confiner's thread.
    await until(lambda: not {w.pid for w in sup.workers._live} & retired)
    removed = asyncio.get_running_loop().create_future()
    sup.confiner.background(lambda: removed.get_loop().call_soon_threadsafe(removed.set_result, None))
    await removed  # the confiner's thread did everything queued before it
    assert not any(psutil.pid_exists(pid) for pid in retired)
    cgroups = {ctx.get_state(f"cgroup_{name}") for name, pid in zip(names, pids) if pid in retired}
    assert cgroups and not any(os.path.exists(path) for path in cgroups)  # gone with their workers


async def test_a_worker_up_before_its_fork_is_reported_gets_no_attempt_until_then():
    """A worker may say hello before the zygote reports its fork (its channel is its own):
    it is handed an attempt only once its pid is known, else its state could be neither
    watched nor killed (here: killed for a forged hello, once)."""
    first = Agent("first", isolation="worker")
    first.add_state("first", record_pid)
    await first.run()
    sup = current_supervisor()
    report, loop = sup.zygote._on_report, asyncio.get_running_loop()

    def late(message):
        if message.get("op") == "spawned":
            loop.call_later(0.3, report, message)
        else:
            report(message)

    sup.zygote._on_report = late
    try:
        violations = sup.statistics().protocol_violations
        agent = Agent("early", isolation="worker")
        # A shape of its own: a new worker, whose fork report comes late.
        agent.add_state("forge_ready", forge_ready, resources=ResourceRequirements(memory_mb=97))
        with pytest.raises(StateFailedError) as info:
            await agent.run()
    finally:
        sup.zygote._on_report = report
    assert info.value.reason.kind == "protocol"
    assert sup.statistics().protocol_violations == violations + 1
    forger = agent.context.get_state("forger")
    await until(lambda: not psutil.pid_exists(forger))


async def leaves_a_writer_behind(context):
    def later():
        open(context.get_state("flag"), "w").close()
        context.set_state("ghost", "written after its state ended")  # refused: its attempt is over

    asyncio.get_running_loop().call_later(0.05, later)
    context.set_state("pid_first", os.getpid())


async def waits_for_the_writer(context):
    while not os.path.exists(context.get_state("flag")):
        await asyncio.sleep(0.01)
    context.set_state("pid_second", os.getpid())


async def test_a_callback_a_state_left_on_its_worker_cannot_write_the_next_states_context(tmp_path):
    # Another agent's run, on the same worker: its context is its own.
    flag = str(tmp_path / "fired")
    first, second = Agent("leaves", isolation="worker"), Agent("next", isolation="worker")
    first.add_state("leaves", leaves_a_writer_behind)
    second.add_state("waits", waits_for_the_writer)
    pid = (await first.run(initial_context={"flag": flag})).get_state("pid_first")
    ctx = await second.run(initial_context={"flag": flag})
    assert ctx.get_state("pid_second") == pid  # the same worker served both
    assert "ghost" not in ctx


async def changes_its_process(context):
    change = context.get_state("change")
    if change == "priority":
        os.nice(5)
    elif change == "cpus":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    elif change == "open files":
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    elif change == "another limit":
        resource.setrlimit(resource.RLIMIT_SIGPENDING, (7, 7))
    elif change == "scheduling policy":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif change == "user":
        os.setgid(65534)
        os.setuid(65534)
    elif change == "environment below os.environ":
        os.putenv("LEFT_BEHIND", "yes")
    elif change == "a raw thread":
        import _thread

        _thread.start_new_thread(time.sleep, (600,))
    elif change == "capabilities":
        assert _LIBC.prctl(24, 21, 0, 0, 0) == 0  # PR_CAPBSET_DROP CAP_SYS_ADMIN
    elif change == "no_new_privs":
        assert _LIBC.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    elif change == "dumpable":
        assert _LIBC.prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE
    else:  # what a worker puts back itself
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = 123.0
        loop.set_exception_handler(lambda loop, context: None)
        loop.set_task_factory(lambda loop, coro, **kwargs: asyncio.Task(coro, loop=loop, **kwargs))
        gc.disable()
        sys.setswitchinterval(0.5)
        sys.path = tuple(sys.path) + ("/left-behind",)  # not even a list
        os.umask(0o077)
        sys.setrecursionlimit(123)
        signal.alarm(1)  # would kill the next state
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the next state's output would be lost
        gone = tempfile.mkdtemp()
        os.chdir(gone)
        os.rmdir(gone)  # its working directory no longer exists
    context.set_state("pid_first", os.getpid())


async def reads_its_process(context):
    umask = os.umask(0)
    os.umask(umask)
    await asyncio.sleep(1.2)  # an alarm left armed would go off meanwhile
    shown = subprocess.run(["env"], capture_output=True, text=True).stdout
    context.set_state("pid_second", os.getpid())
    context.set_state("seen", [os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)),
                               resource.getrlimit(resource.RLIMIT_NOFILE),
                               resource.getrlimit(resource.RLIMIT_SIGPENDING),
                               os.sched_getscheduler(0), os.getresuid(), "LEFT_BEHIND" in shown,
                               len(os.listdir("/proc/self/task")), sys.path, umask, sys.getrecursionlimit(),
                               sorted(signal.pthread_sigmask(signal.SIG_BLOCK, ())), os.getcwd(),
                               os.readlink("/proc/self/fd/1").startswith("pipe:"), _kernel_held(),
                               _loop_and_interpreter()])


_LIBC = ctypes.CDLL(None, use_errno=True)


def _kernel_held() -> list[str]:
    with open("/proc/self/status") as fh:
        held = [line for line in fh if line.startswith(("CapBnd", "CapEff", "NoNewPrivs"))]
    return [*held, f"dumpable {_LIBC.prctl(3, 0, 0, 0, 0)}"]


def _loop_and_interpreter() -> list[object]:
    loop = asyncio.get_running_loop()
    return [loop.get_debug(), loop.slow_callback_duration, loop.get_exception_handler() is None,
            loop.get_task_factory() is None, gc.isenabled(), sys.getswitchinterval()]


@pytest.mark.parametrize("change", ["priority", "cpus", "open files", "another limit", "scheduling policy", "user",
                                    "environment below os.environ", "a raw thread", "capabilities", "no_new_privs",
                                    "dumpable", "what it puts back itself"])
async def test_the_next_state_on_a_worker_gets_its_process_as_a_fresh_one_would(change):
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = Agent("fresh", isolation="process")
    fresh.add_state("reads", reads_its_process)
    expected = (await fresh.run()).get_state("seen")
    first, second = Agent("changes", isolation="worker"), Agent("reads", isolation="worker")
    first.add_state("changes", changes_its_process)
    second.add_state("reads", reads_its_process)
    pid = (await first.run(initial_context={"change": change})).get_state("pid_first")
    ctx = await second.run()
    assert ctx.get_state("seen") == expected
    # What it cannot put back retires the worker; the rest it puts back and serves on.
    assert (ctx.get_state("pid_second") == pid) is (change == "what it puts back itself")


async def uses_threads(context):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # its threads are joined when it ends
        list(pool.map(abs, range(10)))
    context.set_state("pid", os.getpid())


async def test_threads_a_state_joined_do_not_cost_it_its_worker():
    # A joined thread may still be listed by the kernel a moment: not a thread left behind.
    agent = Agent("threads", isolation="worker")
    agent.add_state("uses_threads", uses_threads)
    pids = {(await agent.run()).get_state("pid") for _ in range(100)}
    assert len(pids) == 1


async def keeps_memory(context):
    import json  # any module: what a state hangs on it stays in the worker

    json.kept_by_an_earlier_state = bytearray(150 << 20)
    context.set_state("pid_keeper", os.getpid())


async def needs_memory(context):
    buffer = bytearray(100 << 20)  # fits its 200 MiB on its own
    context.set_state("pid_needer", os.getpid())
    return None if buffer else None


async def test_a_memory_kill_earlier_states_may_explain_is_retried_on_a_new_worker():
    shape = ResourceRequirements(cpu_units=0.5, memory_mb=200)
    keeper, needer = Agent("keeper", isolation="worker"), Agent("needer", isolation="worker")
    keeper.add_state("keeps", keeps_memory, resources=shape)
    needer.add_state("needs", needs_memory, resources=shape, max_retries=1)
    pid = (await keeper.run()).get_state("pid_keeper")
    ctx = await needer.run()
    first = needer.state_metadata["needs"].history[0]
    assert first.outcome == "failed" and "on a worker that had served 1 earlier state(s)" in first.reason
    assert ctx.get_state("pid_needer") != pid  # the retry ran on a new worker, and completed


async def test_a_hello_before_the_report_is_a_violation():
    sup_before = current_supervisor()
    violations = sup_before.statistics().protocol_violations if sup_before else 0
    agent = Agent("forge", isolation="worker")
    agent.add_state("forge_ready", forge_ready)
    with pytest.raises(StateFailedError) as info:
        await agent.run()
    assert info.value.reason.kind == "protocol" and info.value.reason.permanent
    sup = current_supervisor()
    assert sup.statistics().protocol_violations == violations + 1
    forger = agent.context.get_state("forger")
    assert forger not in sup.workers.idle_pids() and not psutil.pid_exists(forger)  # killed, not kept
    after = Agent("after", isolation="worker")
    after.add_state("next", record_pid)
    assert (await after.run()).get_state("pid_next") in sup.workers.idle_pids()


async def test_a_supervisor_shut_down_with_idle_workers_keeps_none_of_their_cgroup_files_open():
    agent = Agent("warm", isolation="worker")
    agent.add_state("s", step_none)
    await agent.run()  # its worker stays, idle, until the supervisor goes
    sup = current_supervisor()
    assert sup is not None and sup.workers.idle_pids()
    dirs = sup.confiner.backend.owned_dirs()
    if not dirs:
        pytest.skip("no cgroups here")
    assert files_under(dirs)  # read back after each attempt, through files kept open
    shutdown_supervisor()
    assert files_under(dirs) == []


async def step_none(context):
    return None


def test_a_supervisor_shut_down_with_live_workers_leaves_no_unclosed_file():
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(
        """
        import gc
        from agent import Agent
        from agent.supervisor import shutdown_supervisor

        async def step(context):
            return None

        agent = Agent("warm", isolation="worker")
        agent.add_state("s", step)
        agent.run_sync()  # its worker stays, idle, until the supervisor goes
        shutdown_supervisor()
        gc.collect()
        print("done", flush=True)
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-X", "dev", "-W", "always::ResourceWarning", "-c", script],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root, AGENT_ECHO="off"))
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-3000:]
    assert "ResourceWarning" not in done.stderr, done.stderr[-3000:]


WHERE = """
import json, os
import psutil
from agent import Agent

async def where(context):
    with open("/proc/self/cgroup") as fh:
        rows = [line.strip().split(":", 2) for line in fh]
    context.set_state("pid", os.getpid())
    context.set_state("dirs", [f"/sys/fs/cgroup/{names}{path}".replace("//", "/")
                               for _, names, path in rows if "/worker-" in path])
"""
"""The start of a script whose state ``where`` notes its worker's pid and cgroup directories."""


def test_an_idle_worker_goes_with_its_cgroup_while_no_event_loop_serves_the_supervisor():
    """After ``run_sync()`` returned nothing serves the supervisor, yet a worker idle for
    ``AGENT_WORKER_IDLE`` seconds still exits then, and its cgroup goes with it."""
    import textwrap

    script = WHERE + textwrap.dedent(
        """
        import time

        agent = Agent("idle", isolation="worker")
        agent.add_state("where", where)
        agent.run_sync()
        pid, dirs = agent.context.get_state("pid"), agent.context.get_state("dirs")

        def alive():
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        deadline = time.monotonic() + 30
        while (alive() or any(map(os.path.isdir, dirs))) and time.monotonic() < deadline:
            time.sleep(0.05)  # no event loop runs here, as in a program between two runs
        print(json.dumps({"dirs": dirs, "alive": alive(), "left": [d for d in dirs if os.path.isdir(d)]}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT, AGENT_ECHO="off", AGENT_WORKER_IDLE="0.3"))
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if not seen["dirs"]:
        pytest.skip("no cgroups here")
    assert not seen["alive"] and seen["left"] == [], seen


@pytest.mark.parametrize("setting", ["AGENT_WORKER_IDLE", "AGENT_WORKER_MAX_AGE"])
def test_a_tiny_idle_or_age_setting_still_serves_every_state(setting: str) -> None:
    """AGENT_WORKER_IDLE shorter than the supervisor's answer to a hello: each fresh worker
    still waits for the attempt it was started for (every one exited first, and the attempt
    then failed with an internal error on negative usage). AGENT_WORKER_MAX_AGE shorter than
    a worker's start: each worker serves one attempt, then is retired (each was retired at
    its first hello, and workers were started and killed without end)."""
    import textwrap

    script = textwrap.dedent(
        """
        import json, os
        from agent import Agent, ResourceRequirements

        async def step(context):
            context.set_state(f"pid_{context.get_state('n', 0)}", os.getpid())
            context.set_state("n", context.get_state("n", 0) + 1)
            return "step" if context.get_state("n") < 3 else None

        agent = Agent("tiny_idle", isolation="worker")
        agent.add_state("step", step, resources=ResourceRequirements(cpu_units=0.5, memory_mb=100))
        agent.run_sync()
        meta = agent.state_metadata["step"]
        print(json.dumps({"n": agent.context.get_state("n"), "status": meta.status.value,
                          "cpu": [r.usage.get("cpu_seconds", 0) for r in meta.history],
                          "pids": {k: v for k, v in agent.context.to_dict().items() if k.startswith("pid_")}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT, "AGENT_ECHO": "off", setting: "0.0001"})
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert (seen["n"], seen["status"]) == (3, "completed") and len(seen["cpu"]) == 3
    assert all(cpu >= 0 for cpu in seen["cpu"]), seen
    if setting == "AGENT_WORKER_MAX_AGE":
        assert len({seen["pids"][k] for k in ("pid_0", "pid_1", "pid_2")}) == 3, seen
    # Each worker went idle at once after its report, and the zygote removed its cgroup while
    # the supervisor read that report: no error (the run hung), no limit "changed".
    assert "protocol_violation" not in done.stderr and "worker_limits_changed" not in done.stderr, done.stderr


async def counts(context):
    context.set_state("n", context.get_state("n", 0) + 1)
    return "counts" if context.get_state("n") < 2 else None


async def test_the_supervisors_own_cleanup_failing_fails_the_state_instead_of_hanging_the_run(monkeypatch):
    from agent.supervisor import worker as worker_module

    def fails(handle):
        raise OSError(errno.EIO, "the cgroup file could not be written")

    monkeypatch.setattr(worker_module, "restart_peak", fails)  # called as an attempt's end is filed
    agent = Agent("cleanup_fails", isolation="worker")
    agent.add_state("counts", counts)
    with pytest.raises(StateFailedError, match="could not be written"):
        await asyncio.wait_for(agent.run(), 30)
    monkeypatch.undo()
    again = Agent("after_it", isolation="worker")
    again.add_state("counts", counts)
    assert (await again.run()).get_state("n") == 2  # the supervisor serves on


@pytest.mark.parametrize("how", ["run_sync", "run"])
def test_a_worker_retired_as_its_attempt_ends_is_gone_when_the_run_returns(how: str) -> None:
    """AGENT_WORKER_MAX_STATES=1 retires each worker as its attempt ends: ``run()`` returns
    only once that worker and its cgroup are gone (after ``run_sync()`` nothing would remove
    the cgroup: no loop serves the supervisor then)."""
    import textwrap

    script = WHERE + textwrap.dedent(
        f"""
        import asyncio

        agent = Agent("retired", isolation="worker")
        agent.add_state("where", where)
        if {how!r} == "run":
            async def main():
                await agent.run()
                return agent.context.get_state("pid"), agent.context.get_state("dirs")
            pid, dirs = asyncio.run(main())
        else:
            agent.run_sync()
            pid, dirs = agent.context.get_state("pid"), agent.context.get_state("dirs")
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        print(json.dumps({{"dirs": dirs, "alive": alive, "left": [d for d in dirs if os.path.isdir(d)]}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT, AGENT_ECHO="off", AGENT_WORKER_MAX_STATES="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not seen["alive"], seen
    if not seen["dirs"]:
        pytest.skip("no cgroups here")
    assert seen["left"] == [], seen


def test_usage_since_a_baseline_is_never_negative() -> None:
    """A worker's cgroup removed under its attempt reads as zeros: its usage is 0, not minus
    the baseline (which the pool refuses, failing the run)."""
    from agent.supervisor.cgroups.base import LimitEvents
    from agent.supervisor.confinement import since

    before = ({"cpu_seconds": 0.25, "io_read_bytes": 4096, "memory_peak_bytes": 10}, LimitEvents(nr_throttled=3))
    usage, events = since(({"cpu_seconds": 0.0, "io_read_bytes": 0, "memory_peak_bytes": 0}, LimitEvents()), before)
    assert usage == {"cpu_seconds": 0, "io_read_bytes": 0, "memory_peak_bytes": 0} and events == LimitEvents()
    usage, events = since(({"cpu_seconds": 0.75, "io_read_bytes": 8192}, LimitEvents(nr_throttled=5)), before)
    assert usage == {"cpu_seconds": 0.5, "io_read_bytes": 4096} and events == LimitEvents(nr_throttled=2)


async def fan_out_two(context):
    return ["a", "b"]


async def wait_for_marker(context):
    """Record whether the marker (made by a state that runs alongside) came within 20 s."""
    marker = context.get_state("marker")
    deadline = time.monotonic() + 20
    while not os.path.exists(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    context.set_state("saw_marker", os.path.exists(marker))


async def make_marker(context):
    Path(context.get_state("marker")).touch()


async def go_slow(context):
    return "slow"


def test_a_worker_start_put_off_on_one_event_loop_is_not_put_off_forever_on_the_next(tmp_path):
    """An attempt waiting for a busy worker has a new one started once it waited as long as a
    start takes, checked by a timer; a timer left by a loop that ended (it never fires) must
    not keep the next loop's attempts waiting for busy workers."""
    shutdown_supervisor()  # one worker, no idle one of an earlier test
    warm = Agent("warm", isolation="worker")
    warm.add_state("s", step_none)
    warm.run_sync()
    pool = current_supervisor().workers
    start_time, pool._start_time = pool._start_time, 3600.0  # the timer outlives its loop
    try:
        fan = Agent("fan", isolation="worker")
        fan.add_state("fan", fan_out_two)
        fan.add_state("a", step_none)
        fan.add_state("b", step_none)  # waits for a's worker: a timer looks again in an hour
        fan.run_sync()
    finally:
        pool._start_time = start_time
    agent = Agent("alongside", isolation="worker")
    agent.add_state("start", go_slow)
    agent.add_state("slow", wait_for_marker)
    agent.add_state("final", make_marker, dependencies={"slow": DependencyType.PARALLEL})
    ctx = agent.run_sync(initial_context={"marker": str(tmp_path / "marker")})
    assert ctx.get_state("saw_marker") is True  # final ran on a second worker, alongside slow


async def test_an_attempt_handed_to_a_worker_gone_idle_with_its_cgroup_goes_to_another():
    """A worker that never served idles out, and the zygote removes its cgroup, while the
    supervisor's loop is busy (it has not heard of the exit): an attempt handed to that
    worker then goes to a new one instead of failing on the missing cgroup."""
    from agent.context import Context
    from agent.executor import Attempt, Isolation
    from agent.supervisor.process import WorkerExecutor, until_ready

    def attempt_of(func):
        return Attempt("gone-idle", "test-agent", "s", func, 1, context=Context(run_id="gone-idle"),
                       isolation=Isolation.WORKER)

    shutdown_supervisor()  # no idle worker of an earlier test
    await until_ready()
    sup = current_supervisor()
    sup.workers._settings = WorkerSettings(idle=0.2)
    try:
        unserved = sup.workers.acquire(attempt_of(step_none))
        unserved.cancel()  # the worker started for it serves nothing
        await until(lambda: sup.workers.statistics().idle == 1)
    finally:
        sup.workers._settings = None
    (worker,) = [w for q in sup.workers._queues.values() for w in q.idle]
    if not worker.confinement.handle or not worker.confinement.handle.procs_files:
        pytest.skip("no cgroups here")
    cgroup = os.path.dirname(worker.confinement.handle.procs_files[0])
    deadline = time.monotonic() + 30
    while not (gone(worker.pid) and not os.path.isdir(cgroup)) and time.monotonic() < deadline:
        time.sleep(0.01)  # the loop does not run meanwhile: the supervisor hears nothing
    assert gone(worker.pid) and not os.path.isdir(cgroup)
    attempt = attempt_of(record_pid)
    await WorkerExecutor().run_attempt(attempt)
    assert attempt.context.get_state("pid_s") not in (None, worker.pid)


async def exits_as_if_idle(context):
    from agent.runtime.worker import EXIT_IDLE

    os._exit(EXIT_IDLE)


async def test_a_state_exiting_with_the_idle_exit_code_fails_instead_of_going_round_for_ever():
    """A worker that exits idle as an attempt's run goes out has not run it (another worker
    takes it); a state that exits with that same code, again and again, has."""
    agent = Agent("as_if_idle", isolation="worker")
    agent.add_state("bye", exits_as_if_idle)
    with pytest.raises(StateFailedError) as info:
        await agent.run(timeout=60)
    assert info.value.reason.kind == "exit_code" and info.value.reason.exit_code == 121
