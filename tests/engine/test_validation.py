"""Every number of the public API is checked when given: NaN, infinities, bools, strings refused."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import pickle
import random

import pytest

from agent import (
    Agent,
    CheckpointError,
    ContextTypeError,
    CoordinationError,
    DependencyConfig,
    DependencyType,
    InvalidConfigurationError,
    Priority,
    ResourcePool,
    ResourceRequestError,
    ResourceRequirements,
    ResourceType,
    RetryPolicy,
    UnencodableValueError,
    WorkflowDefinitionError,
)
from agent import _validate
from agent.coordination import (
    Coordinator,
    PrimitiveType,
    RateLimitStrategy,
    ResourceAllocation,
    create_coordinated_agent,
)
from agent.errors import MonitorConfigurationError
from agent.monitor import RealTimeMetrics
from agent.monitor.collector import MetricsCollector

NAN, INF = float("nan"), float("inf")


async def noop(context):
    return None


async def _async_observer(event):
    return None


def add(**kwargs):
    Agent("a", isolation="inline").add_state("s", noop, **kwargs)


CASES = [
    # (what, call, error, words in the message)
    ("Agent max_concurrent bool", lambda: Agent("a", max_concurrent=True), InvalidConfigurationError, "max_concurrent"),
    ("Agent max_steps float", lambda: Agent("a", max_steps=2.5), InvalidConfigurationError, "max_steps"),
    ("Agent checkpoint_interval nan", lambda: Agent("a", checkpoint_interval=NAN), InvalidConfigurationError, "finite"),
    ("Agent checkpoint_interval 0", lambda: Agent("a", checkpoint_interval=0), InvalidConfigurationError, "> 0"),
    ("Agent cleanup_timeout inf", lambda: Agent("a", cleanup_timeout=INF), InvalidConfigurationError, "finite"),
    ("add_state timeout nan", lambda: add(timeout=NAN), InvalidConfigurationError, "timeout"),
    ("add_state timeout inf", lambda: add(timeout=INF), InvalidConfigurationError, "use None for no limit"),
    ("add_state timeout bool", lambda: add(timeout=True), InvalidConfigurationError, "bool True"),
    ("add_state timeout str", lambda: add(timeout="5"), InvalidConfigurationError, "str '5'"),
    ("add_state priority 99", lambda: add(priority=99), InvalidConfigurationError, "Priority.HIGH"),
    ("add_state max_retries bool", lambda: add(max_retries=True), InvalidConfigurationError, "max_retries"),
    ("RetryPolicy initial_delay nan", lambda: RetryPolicy(initial_delay=NAN), InvalidConfigurationError, "initial_delay"),
    ("RetryPolicy max_delay inf", lambda: RetryPolicy(max_delay=INF), InvalidConfigurationError, "max_delay"),
    ("RetryPolicy exponential_base nan", lambda: RetryPolicy(exponential_base=NAN), InvalidConfigurationError, "base"),
    ("RetryPolicy exponential_base 0.5", lambda: RetryPolicy(exponential_base=0.5), InvalidConfigurationError, ">= 1"),
    ("RetryPolicy jitter 'yes'", lambda: RetryPolicy(jitter="yes"), InvalidConfigurationError, "True or False"),
    ("RetryPolicy max_retries float", lambda: RetryPolicy(max_retries=1.0), InvalidConfigurationError, "int"),
    ("ResourcePool total_memory 'lots'", lambda: ResourcePool(total_memory="lots"), ResourceRequestError, "total_memory"),
    ("ResourcePool total_cpu inf", lambda: ResourcePool(total_cpu=INF), ResourceRequestError, "finite"),
    ("ResourcePool total_gpu bool", lambda: ResourcePool(total_gpu=True), ResourceRequestError, "total_gpu"),
    ("ResourcePool enable_preemption 'no'", lambda: ResourcePool(enable_preemption="no"), ResourceRequestError, "True or False"),
    ("ResourceRequirements cpu_units inf", lambda: ResourceRequirements(cpu_units=INF), ResourceRequestError, "cpu_units"),
    ("ResourceRequirements memory_mb nan", lambda: ResourceRequirements(memory_mb=NAN), ResourceRequestError, "memory_mb"),
    ("ResourceRequirements timeout nan", lambda: ResourceRequirements(timeout=NAN), ResourceRequestError, "timeout"),
    ("ResourceRequirements gpu_units under a share", lambda: ResourceRequirements(gpu_units=0.005),
     ResourceRequestError, "at least 0.01"),
    ("ResourceRequirements pids_max bool", lambda: ResourceRequirements(pids_max=True), ResourceRequestError, "pids_max"),
    # Past what the kernel takes: refused here, not by every attempt's cgroup (EINVAL, retried).
    ("ResourceRequirements pids_max over the kernel's", lambda: ResourceRequirements(pids_max=4_194_305),
     ResourceRequestError, "PID_MAX_LIMIT"),
    ("ResourceRequirements io_read_iops over 32 bits", lambda: ResourceRequirements(io_read_iops=1 << 32),
     ResourceRequestError, "at most 4294967294"),
    ("ResourceRequirements io_write_bps over 63 bits", lambda: ResourceRequirements(io_write_bps=1 << 64),
     ResourceRequestError, "io_write_bps must be at most"),
    # An int no float holds is as infinite as inf: the same error, not an OverflowError.
    ("ResourceRequirements cpu_units 10**400", lambda: ResourceRequirements(cpu_units=10**400), ResourceRequestError,
     "cpu_units must be a finite"),
    ("ResourceRequirements memory_mb 10**400 with another field", lambda: ResourceRequirements(
        memory_mb=10**400, pids_max=5), ResourceRequestError, "memory_mb must be a finite"),
    ("RetryPolicy max_delay 10**400", lambda: RetryPolicy(max_delay=10**400), InvalidConfigurationError, "finite"),
    ("add_state timeout -10**400", lambda: add(timeout=-10**400), InvalidConfigurationError, "timeout must be a finite"),
    ("ResourcePool total_cpu 10**400", lambda: ResourcePool(total_cpu=10**400), ResourceRequestError, "finite"),
    ("ResourceRequirements priority 'urgent'", lambda: ResourceRequirements(priority="urgent"), ResourceRequestError, "priority"),
    ("ResourceRequirements resource_types 'cpu'", lambda: ResourceRequirements(resource_types="cpu"), ResourceRequestError, "ResourceType.CPU"),
    ("DependencyConfig timeout nan", lambda: DependencyConfig(type=DependencyType.REQUIRED, timeout=NAN), InvalidConfigurationError, "timeout"),
    ("DependencyConfig interval inf", lambda: DependencyConfig(interval=INF), InvalidConfigurationError, "interval"),
    ("DependencyConfig type 'maybe'", lambda: DependencyConfig(type="maybe"), InvalidConfigurationError, "DependencyType.REQUIRED"),
    ("DependencyConfig PERIODIC without interval", lambda: DependencyConfig(lifecycle="periodic"), InvalidConfigurationError, "interval="),
    ("DependencyConfig PERIODIC interval 0", lambda: DependencyConfig(lifecycle="periodic", interval=0), InvalidConfigurationError, "interval="),
    ("rate limit burst nan", lambda: create_coordinated_agent("c").add_state_rate_limit("r1", max_rate=1, burst_size=NAN), CoordinationError, "burst_size"),
    ("rate limit max_rate inf", lambda: create_coordinated_agent("c").add_state_rate_limit("r2", max_rate=INF), CoordinationError, "max_rate"),
    ("rate limit window nan", lambda: create_coordinated_agent("c").add_state_rate_limit(
        "r3", max_rate=1, strategy=RateLimitStrategy.SLIDING_WINDOW, window_size=NAN), CoordinationError, "window_size"),
    ("mutex ttl inf", lambda: create_coordinated_agent("c").add_state_coordination("p1", PrimitiveType.MUTEX, ttl=INF), CoordinationError, "ttl"),
    ("semaphore max_count bool", lambda: create_coordinated_agent("c").add_state_coordination(
        "p2", PrimitiveType.SEMAPHORE, max_count=True), CoordinationError, "max_count"),
    ("quota limit nan", lambda: create_coordinated_agent("c").add_state_coordination(
        "p3", PrimitiveType.QUOTA, quota_limit=NAN), CoordinationError, "quota_limit"),
    ("mutex wait_timeout nan", lambda: create_coordinated_agent("c").add_state_coordination(
        "p4", PrimitiveType.MUTEX, wait_timeout=NAN), CoordinationError, "timeout"),
    ("mutex max_count", lambda: create_coordinated_agent("c").add_state_coordination(
        "p5", PrimitiveType.MUTEX, max_count=3), CoordinationError, "takes no max_count"),
    ("semaphore quota_limit", lambda: create_coordinated_agent("c").add_state_coordination(
        "p6", PrimitiveType.SEMAPHORE, max_count=2, quota_limit=3), CoordinationError, "takes no quota_limit"),
    ("quota amount over its limit", lambda: create_coordinated_agent("c").add_state_coordination(
        "p7", PrimitiveType.QUOTA, quota_limit=2, amount=5), CoordinationError, "holds only 2"),
    ("quota of no state", lambda: ResourcePool(enable_quotas=True).set_quota(None, cpu=1),  # type: ignore[arg-type]
     ResourceRequestError, "takes a state name"),
    ("priority quota of 99", lambda: ResourcePool(enable_quotas=True).set_priority_quota(99, cpu=1),
     ResourceRequestError, "Priority.CRITICAL"),
    ("token bucket window negative", lambda: create_coordinated_agent("c").add_state_rate_limit(
        "r4", max_rate=1, window_size=-1), CoordinationError, "window_size"),
    ("Agent context_budget_mb inf", lambda: Agent("a", context_budget_mb=INF), InvalidConfigurationError, "finite"),
    ("Agent context_budget_mb of no bytes", lambda: Agent("a", context_budget_mb=1e-9), InvalidConfigurationError,
     "at least"),
    ("Agent human_input not a provider", lambda: Agent("a", human_input=42), InvalidConfigurationError,
     "ask(request)"),
    ("add_state dependencies 5", lambda: add(dependencies=5), WorkflowDefinitionError, "dependencies must be"),
    ("add_state next_states 5", lambda: add(next_states=5), WorkflowDefinitionError, "next_states"),
    ("add_state priority 1.0", lambda: add(priority=1.0), InvalidConfigurationError, "float 1.0"),
    ("ResourceRequirements resource_types stray bits", lambda: ResourceRequirements(resource_types=12345),
     ResourceRequestError, "joined with |"),
    ("remove_observer never added", lambda: Agent("a").remove_observer(print), InvalidConfigurationError,
     "not an observer"),
    ("add_state dependencies 0", lambda: add(dependencies=0), WorkflowDefinitionError, "dependencies must be"),
    ("add_state dependencies of lists", lambda: add(dependencies=[["x"]]), WorkflowDefinitionError,
     "dependencies must be"),
    ("add_observer 5", lambda: Agent("a").add_observer(5), InvalidConfigurationError, "give a callable"),
    # Each was taken, then failed (or made a coroutine nobody awaited) at every event.
    ("add_observer of no argument", lambda: Agent("a").add_observer(lambda: None), InvalidConfigurationError,
     "must take one argument, the RunEvent"),
    ("add_observer async", lambda: Agent("a").add_observer(_async_observer), InvalidConfigurationError,
     "is an async function, which would be called and never awaited"),
    ("Coordinator resolution 'youngest'", lambda: Coordinator(resolution="youngest"), CoordinationError,
     "DeadlockResolution.FAIL_YOUNGEST"),
    ("Coordinator max_cycles 10**400", lambda: Coordinator(max_cycles=10**400), CoordinationError, "max_cycles"),
    ("Coordinator detection_interval 10**400", lambda: Coordinator(detection_interval=10**400), CoordinationError,
     "detection_interval must be a finite"),
    ("Coordinator cleanup_interval inf", lambda: Coordinator(cleanup_interval=INF), CoordinationError,
     "cleanup_interval must be a finite"),
    ("coordination amount 10**400", lambda: create_coordinated_agent("c").add_state_coordination(
        "p8", PrimitiveType.QUOTA, quota_limit=2, amount=10**400), CoordinationError, "amount must be a finite"),
    ("ResourceAllocation amount 10**400", lambda: ResourceAllocation("q", 10**400, coordinator=Coordinator()),
     CoordinationError, "amount must be a finite"),
    ("MetricsCollector min_window '1'", lambda: MetricsCollector(min_window="1"), MonitorConfigurationError,
     "min_window must be a number of seconds"),
    ("MetricsCollector min_window nan", lambda: MetricsCollector(min_window=NAN), MonitorConfigurationError,
     "min_window must be a finite"),
    ("monitor update_interval 10**400", lambda: RealTimeMetrics(update_interval=10**400), MonitorConfigurationError,
     "update_interval must be a finite"),
    ("add_admission_hook None", lambda: Agent("a").add_admission_hook(None), InvalidConfigurationError,
     "acquire(state, run_id, attempt)"),
    ("resource_pool set to a str", lambda: setattr(Agent("a"), "resource_pool", "x"), InvalidConfigurationError,
     "must be a ResourcePool"),
    # No cgroup takes a limit that small: said when the state is added, not after what runs before it.
    ("add_state memory_mb below a cgroup's least", lambda: Agent("a", isolation="process").add_state(
        "s", noop, resources=ResourceRequirements(memory_mb=0.1)), ResourceRequestError, "below 0.25 MiB"),
    ("add_state worker memory_mb below a cgroup's least", lambda: Agent("a").add_state(
        "s", noop, isolation="worker", resources=ResourceRequirements(memory_mb=0.2)), ResourceRequestError,
     "below 0.25 MiB"),
]


class TestRefused:
    """Each bad number gets the module's typed error, naming the setting and the value."""

    @pytest.mark.parametrize("what,call,error,words", CASES, ids=[c[0] for c in CASES])
    def test_refused(self, what, call, error, words):
        with pytest.raises(error) as raised:
            call()
        assert words in str(raised.value)

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    @pytest.mark.parametrize("kwargs", [{"timeout": NAN}, {"timeout": True}, {"timeout": 0}, {"cleanup_timeout": NAN},
                                        {"initial_context": [("x", 1)]}, {"initial_context": {"x": object()}},
                                        {"initial_context": {5: 1}}, {"start": 3}, {"start": ["s", 3]}])
    async def test_run_arguments(self, kwargs, isolation):
        # A process agent is RUNNING while its supervisor starts: a refusal must not leave it so.
        agent = Agent("r", isolation=isolation)
        agent.add_state("s", noop)
        with pytest.raises((InvalidConfigurationError, WorkflowDefinitionError, UnencodableValueError,
                            ContextTypeError)) as raised:
            await agent.run(**kwargs)
        assert list(kwargs)[0] in str(raised.value) or isinstance(raised.value, (UnencodableValueError,
                                                                                 ContextTypeError))
        assert agent.status.value == "idle"  # nothing started
        await agent.run()  # and it runs

    @pytest.mark.parametrize("checkpoint", ["x", 3, None])
    async def test_restoring_what_is_not_a_checkpoint(self, checkpoint):
        agent = Agent("r", isolation="inline")
        agent.add_state("s", noop)
        with pytest.raises(CheckpointError, match="takes an AgentCheckpoint"):
            await agent.restore_from_checkpoint(checkpoint)


class TestNamesAndStores:
    """What names a state, a key or a stored run is checked at the call, and nothing changes."""

    async def test_resume_run_with_a_bad_run_id_or_store_changes_nothing(self, tmp_path):
        agent = Agent("r", isolation="inline")
        agent.add_state("s", noop)
        with pytest.raises(CheckpointError, match="run id"):
            await agent.resume_run(["a"])
        with pytest.raises(InvalidConfigurationError, match="checkpoint_store"):
            await agent.resume_run("abc", store=5)
        with pytest.raises(CheckpointError, match="no checkpoint of run"):
            await agent.resume_run("abc", store=str(tmp_path / "runs.sqlite3"))  # a path opens a store
        assert agent.checkpoint_store is None
        await agent.run()

    def test_names_are_strings(self):
        from agent import Context, ContextTypeError, UnknownStateError

        agent = Agent("r", isolation="inline")
        agent.add_state("s", noop)
        with pytest.raises(UnknownStateError):
            agent.cancel_state(["s"])
        with pytest.raises(InvalidConfigurationError, match="attempt"):
            agent.logs("s", attempt="1")
        context = Context({"k": 1})
        for read in (context.get_state, context.has_state, context.remove_state):
            for key in (["k"], 5):
                with pytest.raises(ContextTypeError, match="context keys are strings"):
                    read(key)

    async def test_next_states_given_as_a_generator_are_read_once(self):
        agent = Agent("g", isolation="inline")

        async def first(context):
            return "second"

        agent.add_state("first", first, next_states=(n for n in ["second"]))
        agent.add_state("second", noop)
        await agent.run()
        assert agent.state_metadata["second"].status.value == "completed"


class TestInitialContext:
    async def test_a_refused_value_leaves_the_context_as_it_was(self):
        agent = Agent("a", isolation="inline")
        seen = {}

        async def look(context):
            seen.update({key: context.get_state(key) for key in ("a", "b")})

        agent.add_state("look", look)
        with pytest.raises(UnencodableValueError, match="'b'"):
            await agent.run(initial_context={"a": 1, "b": object()})
        await agent.run()
        assert seen == {"a": None, "b": None}  # nothing of the refused mapping was kept


class TestAccepted:
    """Good values still pass, as the types the engine works with."""

    def test_good_values(self):
        assert RetryPolicy(max_retries=0, initial_delay=0, max_delay=1e6, exponential_base=1).backoff(3) == 0
        assert ResourceRequirements(cpu_units=0, memory_mb=1, timeout=0.5, priority=2).priority is Priority.HIGH
        assert ResourcePool(total_cpu=0, total_memory=1).totals
        Agent("a", max_concurrent=1, max_steps=1, checkpoint_interval=0.5, cleanup_timeout=0)
        # Only counted, never a cgroup's limit: inline, or without MEMORY in its types.
        tiny = ResourceRequirements(memory_mb=0.1)
        Agent("a", isolation="inline").add_state("s", noop, resources=tiny)
        Agent("a").add_state("s", noop, resources=ResourceRequirements(
            memory_mb=0.1, resource_types=ResourceType.CPU))

    def test_backoff_beyond_float_range(self):
        """A long retry series reaches max_delay instead of overflowing."""
        assert RetryPolicy(max_retries=5000, initial_delay=1, max_delay=60).backoff(2000) == 60

    async def test_zero_delay_retries_finish(self):
        agent = Agent("r", isolation="inline", retry_policy=RetryPolicy(max_retries=2, initial_delay=0, jitter=False))
        tries = []

        async def flaky(context):
            tries.append(1)
            if len(tries) < 3:
                raise RuntimeError("again")
            return None

        agent.add_state("flaky", flaky)
        await asyncio.wait_for(agent.run(), 30)
        assert len(tries) == 3


class TestRequirementsAsData:
    """A request that gives only some fields (stored are only those; the rest are the
    class's defaults) is the same dataclass value as one that spells every field out."""

    def test_given_and_default_fields_are_one_value(self):
        few = ResourceRequirements(cpu_units=0.5, memory_mb=64)
        every = ResourceRequirements(cpu_units=0.5, memory_mb=64, io_weight=1.0, network_weight=1.0, gpu_units=0.0,
                                     priority=Priority.NORMAL, timeout=None, resource_types=ResourceType.ALL)
        assert few == every and repr(few) == repr(every)
        assert dataclasses.asdict(few) == dataclasses.asdict(every)
        assert dataclasses.asdict(few)["io_weight"] == 1.0
        assert pickle.loads(pickle.dumps(few)) == few
        assert copy.deepcopy(few) == few
        changed = dataclasses.replace(few, gpu_units=0.5, priority=3)
        assert (changed.gpu_units, changed.priority, changed.cpu_units) == (0.5, Priority.CRITICAL, 0.5)
        few.io_weight = 2.0  # still a plain, mutable dataclass
        assert few != every and ResourceRequirements().io_weight == 1.0

    def test_a_default_value_given_explicitly_is_checked_too(self):
        with pytest.raises(ResourceRequestError, match="io_weight"):
            ResourceRequirements(io_weight=True)
        with pytest.raises(ResourceRequestError, match="gpu_units"):
            ResourceRequirements(cpu_units=1, memory_mb=1, gpu_units="0")

    def test_a_dataclass_subclass_is_checked(self):
        @dataclasses.dataclass
        class Tagged(ResourceRequirements):
            tag: str = ""

        assert Tagged(cpu_units=2, tag="x").cpu_units == 2
        with pytest.raises(ResourceRequestError, match="cpu_units"):
            Tagged(cpu_units="2")


class TestHelpers:
    """The helpers return the engine's types and describe what they refuse."""

    def test_number(self):
        assert _validate.number(3, "x", error=InvalidConfigurationError) == 3.0
        assert _validate.number(None, "x", error=InvalidConfigurationError, none=True) is None
        with pytest.raises(InvalidConfigurationError, match=r"x must be a number > 0 \(or None\), got 0"):
            _validate.number(0, "x", error=InvalidConfigurationError, above=True, none=True)
        with pytest.raises(InvalidConfigurationError, match="finite"):
            _validate.number(-math.inf, "x", error=InvalidConfigurationError)

    def test_integer_and_member(self):
        assert _validate.integer(2, "n", error=InvalidConfigurationError, minimum=1) == 2
        with pytest.raises(InvalidConfigurationError, match="int >= 1"):
            _validate.integer(0, "n", error=InvalidConfigurationError, minimum=1)
        assert _validate.member(Priority, 1, "p", error=InvalidConfigurationError) is Priority(1)
        with pytest.raises(InvalidConfigurationError):
            _validate.member(Priority, True, "p", error=InvalidConfigurationError)


class TestRetryPolicyRng:
    """RetryPolicy(rng=...) must have uniform(): refused when the policy is made, not at the first retry."""

    @pytest.mark.parametrize("rng,shown", [(None, "NoneType None"), (5, "int 5"), ("x", "str 'x'")])
    def test_refused(self, rng, shown):
        with pytest.raises(InvalidConfigurationError, match=(
                rf"RetryPolicy.rng must be a random.Random-like object with uniform\(\), e.g. random.Random\(7\), "
                rf"got {shown} \(it has no uniform\(\)\)")):
            RetryPolicy(max_retries=2, initial_delay=0.0, rng=rng)

    def test_random_like(self):
        class Fixed:
            def uniform(self, a: float, b: float) -> float:
                return b

        assert RetryPolicy(initial_delay=2.0, rng=Fixed()).delay(1) == 2.0
        assert 0.0 <= RetryPolicy(initial_delay=2.0, rng=random.Random(7)).delay(1) <= 2.0
