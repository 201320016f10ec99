"""The coordinator: named primitives and limits, status, reset, allocations."""

from __future__ import annotations

import asyncio
import re
import weakref

import pytest

from agent.coordination.allocation import ResourceAllocation, mutex, set_current_owner
from agent.clock import FakeClock, settle
from agent.coordination.coordinator import Coordinator, default_coordinator
from agent.coordination.primitives import PrimitiveType
from agent.coordination.ratelimit import RateLimitStrategy
from agent.errors import CoordinationError


class _Declarer:
    """Stands for an agent: named, weakly referable, and (as an agent is) in a reference cycle."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.me = self


class TestConfiguration:
    """Same settings share one primitive; other settings replace it only when nobody else
    declares the name and nobody uses it."""

    async def test_same_config_is_shared(self, coordinator: Coordinator) -> None:
        a = coordinator.add_primitive("database_write", PrimitiveType.MUTEX, ttl=30.0)
        b = coordinator.add_primitive("database_write", PrimitiveType.MUTEX, ttl=30.0)
        assert a is b

    async def test_other_config_replaces_when_idle(self, coordinator: Coordinator) -> None:
        a = coordinator.add_primitive("x", PrimitiveType.MUTEX)
        b = coordinator.add_primitive("x", PrimitiveType.SEMAPHORE, max_count=3)
        assert a is not b and coordinator.primitive("x") is b

    async def test_other_config_refused_while_in_use(self, coordinator: Coordinator) -> None:
        m = coordinator.add_primitive("x", PrimitiveType.MUTEX)
        await m.acquire("a")
        with pytest.raises(CoordinationError, match="in use"):
            coordinator.add_primitive("x", PrimitiveType.MUTEX, ttl=5.0)
        m.release("a")

    async def test_rate_limit_replaced_by_new_strategy(self, coordinator: Coordinator) -> None:
        first = coordinator.add_rate_limit("api_call", 10.0, RateLimitStrategy.TOKEN_BUCKET, burst_size=5)
        assert coordinator.add_rate_limit("api_call", 10.0, RateLimitStrategy.TOKEN_BUCKET, burst_size=5) is first
        second = coordinator.add_rate_limit("api_call", 100.0, RateLimitStrategy.SLIDING_WINDOW, window_size=60.0)
        assert coordinator.rate_limiter("api_call") is second

    async def test_same_settings_from_another_agent_share_silently(self, coordinator: Coordinator) -> None:
        a, b = _Declarer("a"), _Declarer("b")
        first = coordinator.add_primitive("database_write", PrimitiveType.MUTEX, ttl=30.0, declarer=a)
        assert coordinator.add_primitive("database_write", PrimitiveType.MUTEX, ttl=30.0, declarer=b) is first
        limiter = coordinator.add_rate_limit("api_call", 10.0, burst_size=5, declarer=a)
        assert coordinator.add_rate_limit("api_call", 10.0, burst_size=5, declarer=b) is limiter

    async def test_other_settings_refused_while_another_agent_declares_them(self, coordinator: Coordinator) -> None:
        a, b = _Declarer("a"), _Declarer("b")
        mutex_x = coordinator.add_primitive("x", PrimitiveType.MUTEX, ttl=30.0, declarer=a)
        with pytest.raises(CoordinationError) as refused:
            coordinator.add_primitive("x", PrimitiveType.SEMAPHORE, max_count=3, declarer=b)
        message = str(refused.value)
        for part in ("'x'", "MUTEX(ttl=30)", "SEMAPHORE(max_count=3)", "agent 'a'", "agent 'b'",
                     "another state name", "same settings", "remove_state_coordination('x')"):
            assert part in message
        with pytest.raises(CoordinationError, match="MUTEX"):
            coordinator.add_primitive("x", PrimitiveType.SEMAPHORE, max_count=3)  # nor without a declarer
        assert coordinator.primitive("x") is mutex_x

    async def test_the_only_declarer_may_change_its_settings(self, coordinator: Coordinator) -> None:
        a = _Declarer("a")
        coordinator.add_primitive("x", PrimitiveType.MUTEX, declarer=a)
        semaphore = coordinator.add_primitive("x", PrimitiveType.SEMAPHORE, max_count=3, declarer=a)
        assert coordinator.primitive("x") is semaphore

    async def test_a_declaration_ends_with_its_agent(self, coordinator: Coordinator) -> None:
        a, b = _Declarer("a"), _Declarer("b")
        coordinator.add_primitive("x", PrimitiveType.MUTEX, declarer=a)
        coordinator.add_rate_limit("y", 10.0, declarer=a)
        gone = weakref.ref(a)
        del a  # still in its reference cycle: the coordinator collects it before it refuses
        semaphore = coordinator.add_primitive("x", PrimitiveType.SEMAPHORE, max_count=3, declarer=b)
        bucket = coordinator.add_rate_limit("y", 1.0, RateLimitStrategy.LEAKY_BUCKET, declarer=b)
        assert gone() is None
        assert coordinator.primitive("x") is semaphore and coordinator.rate_limiter("y") is bucket

    async def test_a_withdrawn_declaration_no_longer_counts(self, coordinator: Coordinator) -> None:
        a, b = _Declarer("a"), _Declarer("b")
        coordinator.add_primitive("x", PrimitiveType.MUTEX, declarer=a)
        coordinator.add_rate_limit("y", 10.0, declarer=a)
        coordinator.withdraw_primitive("x", a)
        coordinator.withdraw_rate_limit("y", a)
        coordinator.add_primitive("x", PrimitiveType.SEMAPHORE, max_count=3, declarer=b)
        coordinator.add_rate_limit("y", 1.0, RateLimitStrategy.LEAKY_BUCKET, declarer=b)
        with pytest.raises(CoordinationError, match="agent 'b'"):
            coordinator.add_primitive("x", PrimitiveType.MUTEX, declarer=a)  # b declares it now

    async def test_rate_limit_refused_while_another_agent_declares_it(self, coordinator: Coordinator) -> None:
        c, d = _Declarer("c"), _Declarer("d")
        first = coordinator.add_rate_limit("y", 10.0, declarer=c)
        with pytest.raises(CoordinationError) as refused:
            coordinator.add_rate_limit("y", 1.0, RateLimitStrategy.LEAKY_BUCKET, declarer=d)
        message = str(refused.value)
        for part in ("'y'", "TOKEN_BUCKET(max_rate=10, burst_size=10)", "LEAKY_BUCKET(max_rate=1)", "agent 'c'",
                     "another state name", "same settings", "remove_state_rate_limit('y')"):
            assert part in message
        assert coordinator.rate_limiter("y") is first

    async def test_rate_limit_not_replaced_while_waited_on(self, coordinator: Coordinator, clock: FakeClock) -> None:
        limiter = coordinator.add_rate_limit("y", 1.0, burst_size=1)
        assert limiter.try_acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await settle()
        with pytest.raises(CoordinationError, match="1 wait on it"):
            coordinator.add_rate_limit("y", 5.0, RateLimitStrategy.LEAKY_BUCKET)
        await clock.advance(1.0)
        await waiter
        assert coordinator.rate_limiter("y") is limiter

    def test_intervals_are_checked(self, clock: FakeClock) -> None:
        coord = Coordinator(clock)
        coord.cleanup_interval = 60.0
        with pytest.raises(CoordinationError, match="cleanup_interval"):
            coord.cleanup_interval = 0
        with pytest.raises(CoordinationError, match="detection_interval"):
            coord.deadlock_detector.detection_interval = -1
        with pytest.raises(CoordinationError, match="max_cycles"):
            coord.deadlock_detector.max_cycles = 0

    def test_one_default_per_process(self) -> None:
        assert default_coordinator() is default_coordinator()


class TestStatus:
    """get_status has the spec's shape."""

    async def test_shape(self, coordinator: Coordinator) -> None:
        m = coordinator.add_primitive("db", PrimitiveType.MUTEX)
        coordinator.add_rate_limit("api", 10.0)
        await m.acquire("a")
        waiter = asyncio.create_task(m.acquire("b"))
        await settle()
        status = coordinator.get_status()
        assert set(status) >= {"primitives", "rate_limiters", "deadlock_detector"}
        db = status["primitives"]["db"]
        assert (db["state"], db["owners"], db["wait_count"], db["type"]) == ("locked", ["a"], 1, "mutex")
        assert status["rate_limiters"]["api"]["strategy"] == "token_bucket"
        assert status["deadlock_detector"]["cycle_count"] == 0
        m.release("a")
        await waiter
        m.release("b")


    async def test_walks_what_there_is_while_other_threads_declare(
        self, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Agents are built in other threads while a loop reads the status, resets or
        cleans up: a name declared in the middle of the walk must not break it (each
        primitive's and limiter's own call here declares one more, as such a thread would)."""
        made = iter(range(1000))

        def declaring(original):
            def call(*args, **kwargs):
                n = next(made)
                coordinator.add_primitive(f"new{n}", PrimitiveType.MUTEX)
                coordinator.add_rate_limit(f"new_limit{n}", 5.0)
                return original(*args, **kwargs)
            return call

        db = coordinator.add_primitive("db", PrimitiveType.MUTEX, ttl=30.0)
        api = coordinator.add_rate_limit("api", 10.0)
        for obj, method in ((db, "status"), (db, "reset"), (db, "expire_stale"), (db, "waiters"),
                            (api, "status"), (api, "reset")):
            monkeypatch.setattr(obj, method, declaring(getattr(obj, method)))
        status = coordinator.get_status()
        assert {"db", "api"} <= set(status["primitives"]) | set(status["rate_limiters"])
        coordinator.reset()
        assert coordinator.cleanup() == 0
        assert coordinator._busy() is False
        assert "new0" in coordinator.get_status()["primitives"]


class TestReset:
    """reset releases holders and fails waiters; by name or everything."""

    async def test_reset_everything(self, coordinator: Coordinator) -> None:
        m = coordinator.add_primitive("db", PrimitiveType.MUTEX)
        await m.acquire("a")
        waiter = asyncio.create_task(m.acquire("b"))
        await settle()
        coordinator.reset()
        with pytest.raises(CoordinationError, match="was reset"):
            await waiter
        assert m.owners() == [] and m.try_acquire("c")

    async def test_reset_by_name(self, coordinator: Coordinator) -> None:
        one = coordinator.add_primitive("one", PrimitiveType.MUTEX)
        two = coordinator.add_primitive("two", PrimitiveType.MUTEX)
        await one.acquire("a")
        await two.acquire("a")
        coordinator.reset(["one"])
        assert one.owners() == [] and two.owners() == ["a"]

    async def test_cleanup_expires_idle_holders(self, coordinator: Coordinator, clock: FakeClock) -> None:
        m = coordinator.add_primitive("db", PrimitiveType.MUTEX, ttl=30.0)
        await m.acquire("gone")
        await clock.advance(31)
        assert coordinator.cleanup() == 1


class TestMadeOnUse:
    """A MUTEX that mutex() made on first use lives while it is used: a service that locks
    names made from data (``mutex(f"user-{uid}")``) kept every one for good."""

    async def test_forgotten_once_free(self, coordinator: Coordinator) -> None:
        for uid in range(50):
            async with mutex(f"user-{uid}", owner="request", coordinator=coordinator):
                assert coordinator.primitive(f"user-{uid}").owners() == ["request"]
        assert coordinator.get_status()["primitives"] == {}

    async def test_kept_while_held_or_waited_for_and_when_declared(self, coordinator: Coordinator) -> None:
        declared = _Declarer("service")
        coordinator.add_primitive("declared", PrimitiveType.MUTEX, declarer=declared)
        async with mutex("declared", owner="a", coordinator=coordinator):
            pass
        assert coordinator.primitive("declared") is not None
        first = mutex("busy", owner="a", coordinator=coordinator)
        await first.__aenter__()
        second = asyncio.create_task(mutex("busy", owner="b", coordinator=coordinator).__aenter__())
        await settle()
        await first.__aexit__(None, None, None)  # handed to the waiter: still there
        held = await second
        assert coordinator.primitive("busy").owners() == ["b"]
        await held.__aexit__(None, None, None)
        assert coordinator.primitive("busy") is None

    async def test_a_waiter_that_gives_up_lets_it_go(self, coordinator: Coordinator) -> None:
        first = mutex("busy", owner="a", coordinator=coordinator)
        await first.__aenter__()
        waiter = asyncio.create_task(mutex("busy", owner="b", coordinator=coordinator).__aenter__())
        await settle()
        await first.__aexit__(None, None, None)  # granted to b, which is cancelled before it hears
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert coordinator.primitive("busy") is None

    async def test_one_forgotten_before_it_was_taken_is_not_held_beside_the_new_one(
            self, coordinator: Coordinator) -> None:
        # Another thread's holder let it go between this mutex() and its entry: the name's
        # mutex is a new one by then, and that is the one to hold.
        late = mutex("name", owner="late", coordinator=coordinator)
        async with mutex("name", owner="other", coordinator=coordinator):
            pass
        now = mutex("name", owner="now", coordinator=coordinator)
        await now.__aenter__()
        entered = asyncio.create_task(late.__aenter__())
        await settle()
        assert not entered.done() and coordinator.primitive("name").owners() == ["now"]
        await now.__aexit__(None, None, None)
        await (await entered).__aexit__(None, None, None)
        assert coordinator.primitive("name") is None


class TestResourceAllocation:
    """async with ResourceAllocation(name, amount) draws from the named quota."""

    async def test_draws_and_gives_back(self, coordinator: Coordinator, clock: FakeClock) -> None:
        coordinator.add_primitive("shared_resource", PrimitiveType.QUOTA, quota_limit=100.0, ttl=60.0)
        inside = peak = 0

        async def user(i: int) -> None:
            nonlocal inside, peak
            set_current_owner(f"user{i}")
            async with ResourceAllocation("shared_resource", 10.0, coordinator=coordinator):
                inside += 1
                peak = max(peak, inside)
                await clock.sleep(1.0)
                inside -= 1

        async with clock.autojump():
            await asyncio.gather(*(user(i) for i in range(25)))
        assert peak == 10 and clock.monotonic() == pytest.approx(3.0)
        assert coordinator.primitive("shared_resource").status()["in_use"] == 0

    async def test_unknown_name(self, coordinator: Coordinator) -> None:
        with pytest.raises(CoordinationError, match="no coordination primitive named 'nope'"):
            ResourceAllocation("nope", 1.0, coordinator=coordinator)

    async def test_wrong_type(self, coordinator: Coordinator) -> None:
        coordinator.add_primitive("db", PrimitiveType.MUTEX)
        with pytest.raises(CoordinationError, match="not a QUOTA or SEMAPHORE"):
            ResourceAllocation("db", 1.0, coordinator=coordinator)
        with pytest.raises(CoordinationError, match="not a MUTEX"):
            coordinator.add_primitive("q", PrimitiveType.QUOTA, quota_limit=1.0)
            mutex("q", coordinator=coordinator)


class TestArguments:
    """A wrong amount, coordinator or clock is refused at the call, with CoordinationError."""

    @pytest.mark.parametrize("amount,shown", [
        (True, "bool True"), ("2", "str '2'"), ("x", "str 'x'"), (0, "int 0"), (-1.0, "float -1.0"),
        (float("nan"), "float nan"), (None, "NoneType None"),
    ])
    async def test_allocation_amount(self, coordinator: Coordinator, amount: object, shown: str) -> None:
        coordinator.add_primitive("q", PrimitiveType.QUOTA, quota_limit=5.0)
        with pytest.raises(CoordinationError) as refused:
            ResourceAllocation("q", amount, owner="w", coordinator=coordinator)  # type: ignore[arg-type]
        assert str(refused.value) == (
            f"ResourceAllocation('q'): amount must be a finite number > 0 (the units to draw), got {shown}")
        assert coordinator.primitive("q").status()["in_use"] == 0

    @pytest.mark.parametrize("ttl", ["1", -1, float("nan")])
    async def test_a_bad_mutex_ttl_is_refused_when_the_mutex_exists_already(
            self, coordinator: Coordinator, ttl: object) -> None:
        # Checked only by the first use, which makes the mutex: a later one's went unread.
        mutex("m", ttl=5.0, coordinator=coordinator)
        with pytest.raises(CoordinationError, match=r"mutex\('m'\): ttl must be"):
            mutex("m", ttl=ttl, coordinator=coordinator)  # type: ignore[arg-type]

    async def test_a_barrier_takes_no_ttl(self, coordinator: Coordinator) -> None:
        # It holds nothing once it opens: a ttl was accepted and did nothing.
        with pytest.raises(CoordinationError, match="BARRIER 'merge' takes no ttl.*wait_timeout"):
            coordinator.add_primitive("merge", PrimitiveType.BARRIER, max_count=3, ttl=5.0)
        assert coordinator.primitive("merge") is None

    async def test_allocation_amount_as_int(self, coordinator: Coordinator) -> None:
        coordinator.add_primitive("q", PrimitiveType.QUOTA, quota_limit=5.0)
        async with ResourceAllocation("q", 2, owner="w", coordinator=coordinator) as held:
            assert held.amount == 2.0 and coordinator.primitive("q").status()["in_use"] == 2.0

    @pytest.mark.parametrize("make", [
        lambda c: ResourceAllocation("q", 1.0, owner="w", coordinator=c),
        lambda c: mutex("m", owner="w", coordinator=c),
    ], ids=["ResourceAllocation", "mutex"])
    async def test_coordinator_must_be_one(self, make) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(CoordinationError, match=r"\(coordinator=...\) must be a Coordinator "
                                                    r"\(agent.coordination.Coordinator\(\)\), or None for the "
                                                    r"process's default one, got int 5"):
            make(5)

    @pytest.mark.parametrize("clock,lacks", [
        (5, "monotonic(), sleep()"), ("fake", "monotonic(), sleep()"), (lambda: 0.0, "monotonic(), sleep()"),
    ])
    def test_clock_must_be_a_clock(self, clock: object, lacks: str) -> None:
        with pytest.raises(CoordinationError, match=rf"Coordinator\(clock=...\) must be a Clock .* or None for "
                                                    rf"the system clock, got .* \(it has no {re.escape(lacks)}\)"):
            Coordinator(clock)  # type: ignore[arg-type]

    def test_a_clock_with_monotonic_only_is_refused(self) -> None:
        class Half:
            def monotonic(self) -> float:
                return 0.0

        with pytest.raises(CoordinationError, match=r"\(it has no sleep\(\)\)"):
            Coordinator(Half())  # type: ignore[arg-type]

    def test_none_is_the_system_clock(self) -> None:
        from agent.clock import SYSTEM_CLOCK

        assert Coordinator(None).clock is SYSTEM_CLOCK


class TestBadTimeouts:
    """A bad ``timeout`` is refused when the holding is made, whether or not it would wait."""

    @pytest.mark.parametrize("timeout", [-1, float("nan"), "5", True])
    async def test_refused_while_the_primitive_is_free(self, coordinator: Coordinator, timeout: object) -> None:
        coordinator.add_primitive("q", PrimitiveType.QUOTA, quota_limit=10.0)
        with pytest.raises(CoordinationError, match="timeout must be"):
            mutex("m", owner="w", timeout=timeout, coordinator=coordinator)  # type: ignore[arg-type]
        with pytest.raises(CoordinationError, match="timeout must be"):
            ResourceAllocation("q", 1.0, owner="w", timeout=timeout, coordinator=coordinator)  # type: ignore[arg-type]
        assert coordinator.primitive("q").status()["in_use"] == 0


class TestWatch:
    """The background watch runs only while something waits, then stops by itself."""

    async def test_stops_when_idle(self, coordinator: Coordinator, clock: FakeClock) -> None:
        m = coordinator.add_primitive("db", PrimitiveType.MUTEX)
        await m.acquire("a")
        waiter = asyncio.create_task(m.acquire("b"))
        coordinator.watch()
        await settle()
        assert coordinator.watching
        m.release("a")
        await waiter
        m.release("b")
        await clock.advance(1.0)
        assert not coordinator.watching
