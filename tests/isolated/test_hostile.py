"""Hostile states through the public API: each is stopped with a reason that names what it
did, nothing it sent reaches the run, and a normal workflow runs next in the same supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import gc
import os
import secrets
import signal
import sys
import threading
import uuid
import zoneinfo
from dataclasses import dataclass

import msgpack
import psutil
import pytest

from agent import Agent, Context, ResourceRequirements, RetryPolicy
from agent.checkpoint_store import SQLiteCheckpointStore
from agent.errors import (
    AgentError, ContextTypeError, InvalidTransitionError, StateFailedError, UnencodableValueError,
)
from agent.executor import AttemptFailed
from agent.ipc import PROTOCOL_VERSION, ContextWrite, Hello, Result, encode_message
from agent.ipc.zmtp import DealerTransport
from agent.supervisor import current_supervisor
from agent.values import MAX_OBJECTS, TypedContextData, encode

from .helpers import budget_race, make_attempt, run

MiB = 1024 * 1024
ISOLATED = ["process", "sandbox"]
EVERY_LEVEL = ["inline", *ISOLATED]
ALL_KEYS = ["*"]  # a sandboxed state sees only the keys it is given


@dataclass
class Order(TypedContextData):
    id: uuid.UUID
    price: decimal.Decimal
    placed: dt.datetime
    lines: tuple[str, ...]


def sample() -> dict:
    """One of each type the model carries."""
    return {
        "id": uuid.UUID(int=42), "price": decimal.Decimal("19.990"), "n": 2**80, "pair": (1, "a"),
        "tags": {"x", "y"}, "frozen": frozenset({1}), "blob": b"\x00\xff", "nan": float("nan"),
        "when": dt.datetime(2026, 3, 29, 2, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin")),
        "day": dt.date(2026, 1, 2), "at": dt.time(8, 15), "took": dt.timedelta(seconds=90),
        "order": Order(uuid.UUID(int=1), decimal.Decimal("1.5"), dt.datetime(2026, 1, 1), ("a", "b")),
    }


# --- state functions (module level: children import this module to load them) ---------------


def _own_transport() -> DealerTransport:
    (transport,) = [o for o in gc.get_objects() if isinstance(o, DealerTransport) and o._sock.fileno() >= 0]
    return transport


async def _send_raw_write(key: str, raw_value: bytes) -> None:
    """Send a write whose value is ``raw_value`` as is: what a child that skips the checks can do."""
    head = msgpack.packb({"v": PROTOCOL_VERSION, "t": "context_write", "key": key, "deleted": False})
    _own_transport().send(bytes([head[0] + 1]) + head[1:] + msgpack.packb("value") + raw_value)
    await asyncio.get_running_loop().create_future()  # wait to be killed


async def deep_write(context):
    t = ()
    [t := (t,) for _ in range(300)]
    context.set_state("deep", t)


async def deep_return(context):
    t = ()
    [t := (t,) for _ in range(300)]
    return t


async def deep_raw(context):
    await _send_raw_write("deep", b"\x92\xc7\x00\x01" * 300 + b"\x91\xc7\x00\x01")


async def inflating_raw(context):
    # 12 MB of empty arrays: more than a million objects, ~70x its size if decoded.
    chunk = b"\xdd" + (600_000).to_bytes(4, "big") + b"\x90" * 600_000
    await _send_raw_write("bomb", b"\xdc" + (20).to_bytes(2, "big") + chunk * 20)


async def _send_raw(frame: bytes) -> None:
    _own_transport().send(frame)
    await asyncio.get_running_loop().create_future()  # wait to be killed


async def trailing_garbage(context):
    await _send_raw(msgpack.packb(1) + b"\xff" * (4 * MiB))


async def huge_version(context):
    await _send_raw(msgpack.packb({"v": "A" * (4 * MiB), "t": "log"}))


async def foreign_extension(context):
    await _send_raw(msgpack.packb({"v": PROTOCOL_VERSION, "t": "log", "level": "info",
                                   "message": msgpack.ExtType(99, b"abc")}))


async def float_version(context):
    await _send_raw(msgpack.packb({"v": float(PROTOCOL_VERSION), "t": "log", "level": "info", "message": "x"}))


async def huge_error(context):
    await _send_raw(msgpack.packb({"v": PROTOCOL_VERSION, "t": "error", "exception_type": "E" * MiB,
                                   "message": "m" * (4 * MiB), "traceback": "t" * (4 * MiB)}))


async def long_message(context):
    raise ValueError("x" * 200_000)


async def huge_non_transition(context):
    await _send_raw(msgpack.packb({"v": PROTOCOL_VERSION, "t": "result", "value": None,
                                   "not_a_transition": "n" * (4 * MiB)}))


async def supervisors_message(context):
    await _send_raw(msgpack.packb({"v": PROTOCOL_VERSION, "t": "cancel"}))


async def unknown_fields(context):
    await _send_raw(msgpack.packb({"v": PROTOCOL_VERSION, "t": "log", **{f"f{i}": "x" * 1000 for i in range(5000)}}))


async def over_budget_raw(context):
    await _send_raw_write("blob", encode(b"x" * (2 * MiB)))


async def first_40mb(context):
    context.set_state("blob_first", b"x" * (40 * MiB))
    return "second_40mb"


async def second_40mb(context):
    context.set_state("blob_second", b"x" * (40 * MiB))
    return "normal"


async def fan_out(context):
    return ["w1", "w2"]


async def write_600kb(context):
    context.set_state(f"part_{context.state_name}", b"x" * (600 * 1024))


async def unencodable_write(context):
    context.set_state("lock", asyncio.Lock())


async def echo_sample(context):
    seen = {key: context.get_state(key) for key in sample()}
    context.set_state("seen", seen)
    context.set_state("written", sample())
    return None


async def big_then_small(context):
    for i in range(3):
        context.set_state("blob", os.urandom(2 * MiB))
        context.set_state("blob", f"small {i}")
        context.set_state(f"after_{i}", i)
    return "done"


async def widest(context):
    context.set_state("wide", list(range(MAX_OBJECTS - 1)))  # the list and its elements: MAX_OBJECTS


async def closes_every_descriptor(context):
    os.closerange(0, 65536)  # its channel, its log, its event loop's epoll and wake-up pipe


async def normal(context):
    context.set_state("normal", "ok")


async def wait_for_release(context):
    context.set_state("pid", os.getpid())
    path = context.get_state("release")
    while not os.path.exists(path):
        await asyncio.sleep(0.01)
    context.set_state("victim", "done")
    return "victim done"


async def forge_hello(context):
    """Read a sibling's secret from a file, then say hello and report as that sibling."""
    path = context.get_state("secret_file")
    while not os.path.exists(path):
        await asyncio.sleep(0.01)
    pid, secret = open(path).read().split()
    forged = DealerTransport(_own_transport().endpoint, b"")
    forged.send(encode_message(Hello(pid=int(pid), secret=bytes.fromhex(secret))))
    forged.send(encode_message(ContextWrite("forged", False, True)))
    forged.send(encode_message(Result(None)))
    await asyncio.get_running_loop().create_future()


async def hog_memory(context):
    block = b"\x01" * (200 * MiB)
    return len(block)


async def crash(context):
    os.kill(os.getpid(), signal.SIGSEGV)


async def exit_3(context):
    os._exit(3)


async def sets_a_mistyped_value(context):
    try:
        context.set_state("order", Order(id="not a uuid", price=decimal.Decimal(1), placed=dt.datetime(2026, 1, 1),
                                         lines=()))
    except ContextTypeError as exc:
        context.set_state("refused", str(exc))


async def calls_sys_exit(context):
    sys.exit(3)


async def raises_keyboard_interrupt(context):
    raise KeyboardInterrupt


async def raises_generator_exit(context):
    raise GeneratorExit


async def close_channel(context):
    """Close every socket of this process (its channel to the supervisor among them) and run on."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                os.close(int(fd))
        except OSError:
            pass
    while True:
        await asyncio.sleep(0.05)


class Unprintable(Exception):
    """An exception whose own __str__ and __repr__ raise."""

    def __str__(self) -> str:
        raise ValueError("no str")

    def __repr__(self) -> str:
        raise ValueError("no repr")


async def unprintable(context):
    raise Unprintable()


async def own_pid(context):
    context.set_state("pid", os.getpid())


async def escape_cgroups(context):
    """Move into cgroups the test made, use 400 MB there, and report success."""
    for procs in context.get_state("elsewhere"):
        with open(procs, "w") as fh:
            fh.write(str(os.getpid()))
    block = bytearray(400 * MiB)
    return len(block)


async def escape_quietly(context):
    """Move into cgroups the test made and do nothing there: no figure tells it moved."""
    for procs in context.get_state("elsewhere"):
        with open(procs, "w") as fh:
            fh.write(str(os.getpid()))


# --- helpers ------------------------------------------------------------------------------


class Recorder:
    """Stands in for the supervisor's logger: keeps the warnings it is given."""

    def __init__(self, real):
        self.real, self.warnings = real, []

    def warning(self, event, **fields):
        self.warnings.append(event)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
async def warnings(monkeypatch):
    """What the supervisor warns about during the test."""
    await run(make_attempt(_noop))  # the supervisor exists
    sup = current_supervisor()
    recorder = Recorder(sup.log)
    monkeypatch.setattr(sup, "log", recorder)
    return recorder.warnings


async def _noop(context):
    return None


async def failed(isolation: str, func, *, retries: int = 3, **agent_kwargs) -> StateFailedError:
    agent = Agent(f"hostile-{func.__name__}", isolation=isolation,
                  retry_policy=RetryPolicy(max_retries=retries, initial_delay=0, jitter=False), **agent_kwargs)
    agent.add_state(func.__name__, func, context_keys=ALL_KEYS)
    with pytest.raises(StateFailedError) as info:
        await agent.run()
    return info.value


@contextlib.contextmanager
def cgroups_of_this_test(controllers):
    """v1 cgroups made for the test to escape into; removed after it, with whatever is left in them."""
    name = f"agent-test-escape-{secrets.token_hex(3)}"
    dirs = [f"/sys/fs/cgroup/{c}/{name}" for c in controllers]
    for d in dirs:
        os.mkdir(d)
    try:
        yield dirs
    finally:
        with open(f"{dirs[0]}/cgroup.procs") as fh:
            for pid in map(int, fh.read().split()):  # only when a test failed: an escaped process
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
                    psutil.Process(pid).wait(timeout=10)
        for d in dirs:
            os.rmdir(d)


async def stops_its_parent(context):
    os.kill(os.getppid(), signal.SIGSTOP)


async def still_serving(isolation: str) -> None:
    agent = Agent("normal", isolation=isolation)
    agent.add_state("normal", normal, context_keys=ALL_KEYS)
    assert (await agent.run()).get_state("normal") == "ok"


# --- the tests ------------------------------------------------------------------------------


class TestDeepValues:
    """Deep nesting: refused by the model in every level, bounded when forced onto the wire."""

    @pytest.mark.parametrize("isolation", EVERY_LEVEL)
    async def test_a_deep_write_fails_in_the_state_and_is_not_retried(self, isolation):
        exc = await failed(isolation, deep_write)
        assert exc.attempts == 1 and exc.reason.permanent
        assert exc.reason.exception_type.endswith("UnencodableValueError")
        assert "context key 'deep'" in exc.reason.message and "nested deeper than 64 levels" in exc.reason.message
        await still_serving(isolation)

    @pytest.mark.parametrize("isolation", EVERY_LEVEL)
    async def test_a_deep_return_value(self, isolation):
        # No transition, whatever its depth: refused for that, as inline, in words of bounded length.
        agent = Agent("deep_return", isolation=isolation)
        agent.add_state("deep_return", deep_return, context_keys=ALL_KEYS)
        with pytest.raises(InvalidTransitionError, match=r"returned a list containing tuple \(\(\(") as info:
            await agent.run()
        assert "characters more" in str(info.value)
        await still_serving(isolation)

    @pytest.mark.parametrize("isolation", ISOLATED)
    async def test_a_deep_frame_kills_its_sender(self, isolation):
        before = current_supervisor().statistics().bounds_exceeded if current_supervisor() else 0
        exc = await failed(isolation, deep_raw)
        assert (exc.reason.kind, exc.attempts) == ("bound", 1)
        assert "nested deeper than 64 levels" in exc.reason.message
        assert current_supervisor().statistics().bounds_exceeded == before + 1
        await still_serving(isolation)


class TestInflation:
    """A frame that would inflate in memory stops at the objects bound; big frames keep their order."""

    @pytest.mark.parametrize("isolation", ISOLATED)
    async def test_inflating_frame(self, isolation):
        exc = await failed(isolation, inflating_raw)
        assert exc.reason.kind == "bound" and "objects" in exc.reason.message
        await still_serving(isolation)

    @pytest.mark.parametrize("isolation", ["inline", "process", "worker"])
    async def test_a_value_at_the_objects_bound_is_stored(self, isolation):
        # The frame around it adds objects of its own, which the bound does not count.
        agent = Agent("at_bound", isolation=isolation)
        agent.add_state("widest", widest)
        assert len((await agent.run()).get_state("wide")) == MAX_OBJECTS - 1

    async def test_big_frames_are_applied_in_order(self):
        seen = []
        ctx = Context(on_write=lambda key, value, deleted: seen.append((key, "big" if type(value) is bytes else value)))
        assert (await run(make_attempt(big_then_small, context=ctx))).result == "done"
        assert seen == [item for i in range(3) for item in (("blob", "big"), ("blob", f"small {i}"), (f"after_{i}", i))]
        assert ctx.get_state("blob") == "small 2"


class TestContextBudget:
    """The run's context budget holds at write time, in the writing state."""

    @pytest.mark.parametrize("isolation", EVERY_LEVEL)
    async def test_a_write_past_the_budget_fails_where_it_is_made(self, isolation):
        agent = Agent("budget", isolation=isolation, retry_policy=RetryPolicy(max_retries=2, initial_delay=0))
        agent.add_state("first_40mb", first_40mb, context_keys=ALL_KEYS)
        agent.add_state("second_40mb", second_40mb, context_keys=ALL_KEYS)
        agent.add_state("normal", normal, context_keys=ALL_KEYS)
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        exc = info.value
        assert exc.state == "second_40mb" and exc.attempts == 1 and exc.reason.permanent
        assert exc.reason.exception_type.endswith("ContextBudgetError")
        assert "over its budget of 48.0 MiB" in exc.reason.message
        assert list(agent.context.keys()) == ["blob_first"]
        await still_serving(isolation)  # a new isolated state starts: its snapshot fits

    async def test_concurrent_writers_cannot_pass_it_together(self):
        await budget_race("process", fan_out, write_600kb, ("w1", "w2"))
        await still_serving("process")

    @pytest.mark.parametrize("isolation", ISOLATED)
    async def test_a_child_that_skips_the_check_is_killed(self, isolation):
        exc = await failed(isolation, over_budget_raw, context_budget_mb=1)
        assert exc.reason.kind == "bound" and "the context budget bound" in exc.reason.message
        await still_serving(isolation)

    def test_budget_is_validated(self):
        with pytest.raises(AgentError, match="context_budget_mb must be a number > 0"):
            Agent("a", context_budget_mb=0)
        with pytest.raises(AgentError, match="over what one child's start message can carry"):
            Agent("a", context_budget_mb=64)


class TestUnencodableValues:
    """A value outside the model fails at set_state / initial_context time, in every level."""

    @pytest.mark.parametrize("isolation", EVERY_LEVEL)
    async def test_in_a_write(self, isolation):
        exc = await failed(isolation, unencodable_write)
        assert exc.attempts == 1 and exc.reason.exception_type.endswith("UnencodableValueError")
        assert "context key 'lock'" in exc.reason.message and "asyncio.locks.Lock" in exc.reason.message
        await still_serving(isolation)

    @pytest.mark.parametrize("isolation", EVERY_LEVEL)
    async def test_in_initial_context(self, isolation):
        agent = Agent("initial", isolation=isolation)
        agent.add_state("normal", normal, context_keys=ALL_KEYS)
        with pytest.raises(UnencodableValueError, match="context key 'lock': a _thread.lock cannot be stored"):
            await agent.run(initial_context={"fine": 1, "lock": threading.Lock()})
        assert agent.state_metadata["normal"].total_attempts == 0
        await still_serving(isolation)


class TestSameValuesEverywhere:
    """Every type of the model reads back identically inline, in a child and from a checkpoint."""

    @pytest.mark.parametrize("isolation", [*EVERY_LEVEL, "worker"])
    async def test_a_mistyped_typed_value_is_refused_where_it_is_set(self, isolation):
        agent = Agent("mistyped", isolation=isolation)
        agent.add_state("sets", sets_a_mistyped_value, context_keys=ALL_KEYS)
        ctx = await agent.run()
        assert "order" not in ctx
        assert ctx.get_state("refused") == ("context key 'order': Order.id must be UUID, got str 'not a uuid'; "
                                            "give each field a value of its annotated type")

    async def test_round_trip(self, tmp_path):
        results = {}
        for isolation in EVERY_LEVEL:
            store = SQLiteCheckpointStore(tmp_path / f"{isolation}.sqlite3")
            agent = Agent("values", isolation=isolation, checkpoint_store=store)
            agent.add_state("echo", echo_sample, context_keys=ALL_KEYS)
            ctx = await agent.run(initial_context=sample())
            saved = store.latest(agent.run_id)
            store.close()
            results[isolation] = (ctx.get_state("seen"), ctx.get_state("written"), saved.context["written"])
        expected = sample()
        for isolation, (seen, written, checkpointed) in results.items():
            for got in (seen, written, checkpointed):
                assert list(got) == list(expected), isolation
                for key, value in expected.items():
                    assert type(got[key]) is type(value), (isolation, key)
                    if isinstance(value, (set, frozenset)):  # its repr's order follows the process's hash seed
                        assert got[key] == value, (isolation, key)
                    else:  # repr: a NaN, a zone and a fold compare too
                        assert repr(got[key]) == repr(value), (isolation, key)


class TestIdentity:
    """A hello with another child's secret kills its sender and leaves that child untouched."""

    async def test_forged_hello_from_a_sibling(self, tmp_path):
        release, secret_file = tmp_path / "release", tmp_path / "secret"
        started = asyncio.Event()
        victim_ctx = Context({"release": str(release)},
                             on_write=lambda key, value, deleted: key == "pid" and started.set())
        victim = asyncio.ensure_future(run(make_attempt(wait_for_release, context=victim_ctx, state="victim")))
        await started.wait()
        # An idle worker left by an earlier test (not retired yet) serves no attempt.
        (child,) = [c for c in current_supervisor()._by_secret.values()
                    if c.attempt is not None and c.attempt.state_name == "victim"]
        forger = asyncio.ensure_future(run(make_attempt(forge_hello, context=Context({"secret_file": str(secret_file)}),
                                                        state="forger")))
        secret_file.write_text(f"{child.pid} {child.secret.hex()}")
        with pytest.raises(AttemptFailed) as info:
            await forger
        assert info.value.reason.kind == "protocol"
        assert "identity of state 'victim'" in info.value.reason.message
        release.touch()
        assert (await victim).result == "victim done"
        assert victim_ctx.get_state("victim") == "done" and "forged" not in victim_ctx
        await still_serving("process")


class TestBadFrames:
    """A frame that is not a message of ours kills its sender; the reason quotes it in short."""

    @pytest.mark.parametrize("isolation", ISOLATED)
    @pytest.mark.parametrize(("func", "quoted"), [
        ("trailing_garbage", "malformed data: ExtraData"),
        ("huge_version", "protocol version 'AAAA"),
        ("supervisors_message", "message type 'cancel' is not allowed here"),
        ("unknown_fields", "log message has fields"),
        ("foreign_extension", "malformed value: an extension type that carries data"),
        ("float_version", "protocol version 5.0 is not 5"),
    ])
    async def test_a_bad_frame(self, isolation, func, quoted):
        exc = await failed(isolation, globals()[func], retries=0)
        assert exc.reason.kind == "protocol" and quoted in exc.reason.message
        assert len(exc.reason.message) < 2000  # megabytes were sent
        await still_serving(isolation)

    @pytest.mark.parametrize("isolation", ISOLATED)
    async def test_what_a_failure_quotes_of_a_report_is_bounded(self, isolation):
        exc = await failed(isolation, huge_error, retries=0)
        assert exc.reason.kind == "exception" and "characters cut" in exc.reason.message
        assert len(str(exc)) < 100_000 and len(exc.reason.exception_type or "") < 300  # megabytes were sent
        agent = Agent("huge_non_transition", isolation=isolation)
        agent.add_state("huge_non_transition", huge_non_transition)
        with pytest.raises(InvalidTransitionError) as info:
            await agent.run()
        assert "characters cut" in str(info.value) and len(str(info.value)) < 100_000
        await still_serving(isolation)

    async def test_a_long_exception_message_reads_the_same_at_every_level(self):
        """Cut to the same 32 KiB inline as from a child: before, inline kept all 200,000."""
        messages = set()
        for isolation in ["inline", "process", "worker"]:
            exc = await failed(isolation, long_message, retries=0)
            assert exc.reason.message.endswith("... [167,232 characters cut]"), isolation
            assert len(exc.reason.traceback) < 33_000 and "characters cut]" in exc.reason.traceback, isolation
            messages.add(exc.reason.message)
        assert len(messages) == 1


class TestHonestReasons:
    """Each way a process ends reads as exactly one kind, with no false warning beside it."""

    async def test_memory_limit_kill(self, warnings):
        agent = Agent("oom", isolation="process", retry_policy=RetryPolicy(max_retries=2, initial_delay=0))
        agent.add_state("hog", hog_memory, resources=ResourceRequirements(memory_mb=64))
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        assert (info.value.reason.kind, info.value.attempts) == ("limit", 1)
        assert warnings == []
        await still_serving("process")

    @pytest.mark.parametrize("func, kind", [(crash, "signal"), (exit_3, "exit_code")])
    async def test_crashes(self, warnings, func, kind):
        exc = await failed("process", func, retries=1)
        assert exc.reason.kind == kind and exc.attempts == 2  # not permanent: retried
        assert warnings == []

    @pytest.mark.parametrize("isolation, func, message", [
        (isolation, func, message)
        for isolation in [*EVERY_LEVEL, "worker"]
        for func, message in [(calls_sys_exit, "SystemExit: 3"), (raises_keyboard_interrupt, "KeyboardInterrupt"),
                              (raises_generator_exit, "GeneratorExit")]
        # Inline, KeyboardInterrupt is how Ctrl-C stops the program: it is left to do that.
        if not (isolation == "inline" and func is raises_keyboard_interrupt)
    ])
    async def test_what_asyncio_would_carry_out_of_the_loop_is_a_failed_attempt(self, warnings, isolation,
                                                                                  func, message):
        # sys.exit() in a state ends neither the program nor a worker: the attempt failed, it
        # is retried, and the next state (on the same worker) runs.
        exc = await failed(isolation, func, retries=1)
        assert (exc.reason.kind, exc.attempts, exc.reason.message) == ("exception", 2, message)
        assert warnings == []
        await still_serving(isolation)

    @pytest.mark.timeout(120)
    async def test_a_state_that_stops_its_parent_does_not_hang_the_run(self, warnings):
        # SIGSTOP to the zygote: it would neither reap nor report the state's exit, and the
        # run would wait for it for good (no timeout, no cancel ended it). It is continued.
        sup = current_supervisor()
        try:
            agent = Agent("stops_parent", isolation="process")
            agent.add_state("stop", stops_its_parent)
            await asyncio.wait_for(agent.run(), 60)
            assert warnings == ["zygote_continued"]
            await still_serving("process")
        finally:
            os.kill(sup.zygote.pid, signal.SIGCONT)  # (where it is not continued: for the tests after)

    async def test_a_state_that_exits_at_once_is_judged_at_once(self, warnings):
        # Its hello and its disconnect often reach the supervisor together, after it was
        # reaped: still its own hello, and its exit is judged without waiting for a disconnect.
        exc = await failed("process", exit_3, retries=9)
        assert exc.reason.kind == "exit_code" and exc.attempts == 10
        assert warnings == []

    @pytest.mark.parametrize("isolation", [*ISOLATED, "worker"])
    async def test_a_state_that_closes_every_descriptor_is_told_why_its_log_is_empty(self, isolation):
        # It aborts (its event loop's descriptors gone) or exits for its lost channel, its
        # log empty: the reason says why there is nothing to read.
        exc = await failed(isolation, closes_every_descriptor, retries=0)
        assert "os.closerange(0, ...)" in exc.reason.message and "see the log below" not in exc.reason.message
        await still_serving(isolation)

    @pytest.mark.parametrize("isolation", [*ISOLATED, "worker"])
    async def test_a_state_that_closes_its_channel_and_runs_on_is_killed(self, isolation):
        # However soon it closes (its disconnect may come before its hello is read), it is
        # killed for a lost connection: permanent, not retried, no hang.
        for _ in range(3):
            exc = await failed(isolation, close_channel, retries=2)
            assert (exc.reason.kind, exc.attempts) == ("protocol", 1), exc.reason.message
            assert "closed that connection" in exc.reason.message
        await still_serving(isolation)

    @pytest.mark.parametrize("isolation", [*EVERY_LEVEL, "worker"])
    async def test_an_exception_that_cannot_be_printed_is_an_exception(self, warnings, isolation):
        exc = await failed(isolation, unprintable, retries=1)
        assert (exc.reason.kind, exc.attempts) == ("exception", 2)  # like any other: retried
        assert exc.reason.message.endswith("<str() of this Unprintable raised ValueError>")
        assert "Unprintable" in exc.reason.traceback
        assert warnings == []
        await still_serving(isolation)

    async def test_external_sigkill_reads_as_a_signal(self, warnings):
        started = asyncio.Event()
        ctx = Context({"release": "/nonexistent"}, on_write=lambda key, value, deleted: key == "pid" and started.set())
        task = asyncio.ensure_future(run(make_attempt(wait_for_release, context=ctx)))
        await started.wait()
        os.kill(ctx.get_state("pid"), signal.SIGKILL)
        with pytest.raises(AttemptFailed) as info:
            await task
        reason = info.value.reason
        assert (reason.kind, reason.signal) == ("signal", signal.SIGKILL)
        assert "from outside the supervisor" in reason.message and not reason.permanent
        assert "a cgroup around it, such as an agentd user quota" in reason.message  # where to look
        assert warnings == []

    @pytest.mark.parametrize("controllers", [("memory",), ("memory", "cpuacct", "pids")],
                             ids=["memory-only", "every-controller"])
    async def test_a_process_that_leaves_its_cgroup_is_reported(self, controllers):
        if current_supervisor() is None:
            await run(make_attempt(_noop))
        confiner = current_supervisor().confiner
        if confiner.backend_name != "v1":
            pytest.skip("needs root and cgroup v1")
        with cgroups_of_this_test(controllers) as dirs:
            agent = Agent("escape", isolation="process")
            agent.add_state("escape", escape_cgroups)
            with pytest.raises(StateFailedError) as info:
                await agent.run(initial_context={"elsewhere": [f"{d}/cgroup.procs" for d in dirs]})
            reason = info.value.reason
            assert reason.kind == "cgroup_escape" and reason.permanent
            assert "left the cgroup it was put in" in reason.message, reason.message
            assert agent.state_metadata["escape"].usage == {}
        await still_serving("process")

    @pytest.mark.parametrize(("escape", "controllers"), [
        (escape_cgroups, ("memory", "cpuacct", "pids")), (escape_quietly, ("memory", "cpuacct", "pids")),
        (escape_quietly, ("pids",)),
    ], ids=["then-uses-memory", "quietly", "quietly-pids-only"])
    async def test_a_worker_that_left_its_cgroup_serves_no_other_state(self, escape, controllers):
        """Found by where the worker is, not only by its figures: one that moved out and did
        nothing more was kept, and the next state of its shape ran with no limits."""
        if current_supervisor() is None:
            await run(make_attempt(_noop))
        if current_supervisor().confiner.backend_name != "v1":
            pytest.skip("needs root and cgroup v1")
        with cgroups_of_this_test(controllers) as dirs:
            agent = Agent("escape", isolation="worker")
            agent.add_state("escape", escape)
            with pytest.raises(StateFailedError) as info:
                await agent.run(initial_context={"elsewhere": [f"{d}/cgroup.procs" for d in dirs]})
            assert info.value.reason.kind == "cgroup_escape"
            with open(f"{dirs[0]}/cgroup.procs") as fh:
                escaped = [int(pid) for pid in fh.read().split()]
            for i in range(2):  # states of the same shape, of other agents: another worker each time
                innocent = Agent(f"innocent{i}", isolation="worker")
                innocent.add_state("pid", own_pid)
                assert (await innocent.run()).get_state("pid") not in escaped
            for pid in escaped:  # retired: killed
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).wait(timeout=10)



ATTEMPT_TOTAL = """
import asyncio, gc
from agent import Agent
from agent.errors import StateFailedError
from agent.ipc import ContextWrite, encode_message
from agent.ipc.zmtp import DealerTransport

async def flood(context):
    (own,) = [o for o in gc.get_objects() if isinstance(o, DealerTransport) and o._sock.fileno() >= 0]
    frame = encode_message(ContextWrite("same", False, b"x" * 700_000))
    for _ in range(100):  # 70 MB in all, each write within the budget
        own.send(frame)
    await asyncio.sleep(60)

async def widest(context):
    context.set_state("wide", list(range(MAX_OBJECTS - 1)))  # the list and its elements: MAX_OBJECTS


async def normal(context):
    context.set_state("ok", True)

async def main():
    agent = Agent("flood", isolation="process")
    agent.add_state("flood", flood)
    try:
        await agent.run()
    except StateFailedError as exc:
        print(exc.reason.kind, exc.reason.message)
    agent = Agent("normal", isolation="process")
    agent.add_state("normal", normal)
    print("normal", (await agent.run()).get_state("ok"))

asyncio.run(main())
"""


def test_per_attempt_bytes_bound(tmp_path):
    """With a 1 MiB frame cap, one attempt may send 64 MiB in all."""
    import subprocess
    import sys

    script = tmp_path / "flood.py"
    script.write_text(ATTEMPT_TOTAL)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "AGENT_IPC_MAX_FRAME": str(MiB), "AGENT_STOP_GRACE": "0.5"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("bound ") and "the per-attempt bytes bound" in first
    assert second == "normal True"


LOCAL_CLASS = """
import asyncio
from dataclasses import dataclass
from agent import Agent, TypedContextData
from agent.errors import StateFailedError

def make():
    @dataclass
    class Local(TypedContextData):
        x: int
    return Local

Local = make()  # sent to the child by value (this file runs as __main__), with its qualname

async def store(context):
    context.set_typed("loc", Local(x=1))
    return "read"

async def read(context):
    return None

agent = Agent("local", isolation="process")
agent.add_state("store", store)
agent.add_state("read", read)
try:
    asyncio.run(agent.run())
except StateFailedError as exc:
    print(exc.state, exc.reason.permanent, exc.reason.message)
"""


def test_a_typed_class_defined_in_a_function_fails_the_state_that_stores_it(tmp_path):
    """As inline: the state that stores it fails, not the next one (whose start could not carry it)."""
    import subprocess
    import sys

    script = tmp_path / "local.py"
    script.write_text(LOCAL_CLASS)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr
    state, permanent, message = done.stdout.strip().split(" ", 2)
    assert (state, permanent) == ("store", "True")
    assert "context key 'loc': make.<locals>.Local is defined inside a function" in message
    assert "at module level" in message
