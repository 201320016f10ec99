"""Retries, backoff, per-state timeouts and what a failure tells the user."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from agent import (
    Agent,
    AgentStatus,
    RetryPolicy,
    StateFailedError,
    StateStatus,
    StateTimeoutError,
)
from agent.errors import FAILURE_KINDS, FailureReason, InvalidConfigurationError


class TestRetryPolicy:
    """delay = min(max_delay, initial * base**(n-1)), full jitter when asked."""

    def test_backoff_without_jitter(self):
        policy = RetryPolicy(max_retries=5, initial_delay=1.0, max_delay=5.0, exponential_base=2.0, jitter=False)
        assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]

    def test_full_jitter_stays_within_the_ceiling(self):
        policy = RetryPolicy(initial_delay=1.0, max_delay=60.0, jitter=True, rng=random.Random(7))
        delays = [policy.delay(3) for _ in range(200)]
        assert all(0.0 <= d <= 4.0 for d in delays)
        assert len(set(delays)) > 100  # really random, not the ceiling

    def test_zero_retries_means_one_attempt(self):
        assert RetryPolicy(max_retries=0).max_retries == 0


def flaky(failures: int, calls: list):
    async def state(context):
        calls.append(context.attempt)
        if len(calls) <= failures:
            raise ConnectionError(f"attempt {len(calls)} failed")
        context.set_state("done", True)

    return state


class TestRetries:
    """A failing state is retried per its policy; attempts are counted."""

    async def test_succeeds_after_retries(self):
        calls: list = []
        agent = Agent("retry", isolation="inline")
        agent.add_state("api_call", flaky(2, calls),
                        retry_policy=RetryPolicy(max_retries=3, initial_delay=0.0, jitter=False))
        ctx = await agent.run()
        assert ctx.get_state("done") is True
        assert calls == [1, 2, 3]
        meta = agent.state_metadata["api_call"]
        assert meta.attempts == 3
        assert [r.outcome for r in meta.history] == ["failed", "failed", "completed"]
        # The state did not fail: no error is left on it; each failed attempt keeps its own.
        assert meta.error is None and meta.error_message is None and meta.to_dict()["error"] is None
        assert [r.reason for r in meta.history] == ["ConnectionError: attempt 1 failed",
                                                     "ConnectionError: attempt 2 failed", None]

    async def test_exhausted_retries_fail_the_run_with_details(self):
        calls: list = []
        agent = Agent("retry", isolation="inline")
        agent.add_state("api_call", flaky(10, calls),
                        retry_policy=RetryPolicy(max_retries=2, initial_delay=0.001, jitter=False))
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        err = info.value
        assert err.state == "api_call"
        assert err.attempts == 3
        assert err.reason.kind == "exception"
        assert err.reason.exception_type == "builtins.ConnectionError"  # as an isolated state says it
        assert "ConnectionError: attempt 3 failed" in str(err)
        assert "Traceback" in err.traceback and "raise ConnectionError" in err.traceback
        # It starts at the state's own code: none of the engine's frames that called it.
        assert err.traceback.splitlines()[1].startswith(f'  File "{__file__}"'), err.traceback
        assert agent.status is AgentStatus.FAILED
        assert agent.state_metadata["api_call"].status is StateStatus.FAILED

    async def test_add_state_max_retries_overrides_policy(self):
        calls: list = []
        agent = Agent("retry", isolation="inline")
        agent.add_state("api_call", flaky(10, calls), max_retries=0,
                        retry_policy=RetryPolicy(max_retries=5, initial_delay=0.0))
        with pytest.raises(StateFailedError, match="after 1 attempt:"):
            await agent.run()
        assert calls == [1]

    async def test_agent_default_policy(self):
        calls: list = []
        agent = Agent("retry", isolation="inline", retry_policy=RetryPolicy(max_retries=2, initial_delay=0.0))
        agent.add_state("s", flaky(2, calls))
        await agent.run()
        assert calls == [1, 2, 3]
        assert agent.state_metadata["s"].max_retries == 2

    async def test_no_retries_by_default(self):
        calls: list = []
        agent = Agent("retry", isolation="inline")
        agent.add_state("s", flaky(1, calls))
        with pytest.raises(StateFailedError):
            await agent.run()
        assert calls == [1]

    async def test_failure_cancels_siblings(self):
        cancelled = asyncio.Event()
        agent = Agent("siblings", isolation="inline")

        async def start(context):
            return ["bad", "slow"]

        async def bad(context):
            await asyncio.sleep(0)
            raise ValueError("boom")

        async def slow(context):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        agent.add_state("start", start)
        agent.add_state("bad", bad)
        agent.add_state("slow", slow)
        with pytest.raises(StateFailedError, match="ValueError: boom"):
            await agent.run()
        assert cancelled.is_set()
        assert agent.state_metadata["slow"].status is StateStatus.CANCELLED


class TestTimeouts:
    """A state past its timeout is a failed attempt with reason timeout."""

    async def test_timeout_then_retry_then_fail(self):
        calls: list = []
        agent = Agent("timeouts", isolation="inline")

        async def hang(context):
            calls.append(1)
            await asyncio.Event().wait()

        agent.add_state("hang", hang, timeout=0.05, max_retries=1)
        with pytest.raises(StateTimeoutError) as info:
            await agent.run()
        assert info.value.reason.kind == "timeout"
        assert "timed out after 0.05 s" in str(info.value)
        assert calls == [1, 1]
        assert agent.state_metadata["hang"].status is StateStatus.TIMEOUT

    @pytest.mark.parametrize("awaits", [True, False], ids=["awaits", "never_awaits"])
    async def test_an_inline_state_that_blocks_past_its_timeout_timed_out(self, awaits: bool):
        # It cannot be cancelled while it blocks the event loop; it fails as timed out when it
        # returns, and is retried like any timed-out attempt.
        calls: list = []
        agent = Agent("blocks", isolation="inline")

        if awaits:
            async def blocks(context):
                calls.append(1)
                await asyncio.sleep(0)
                time.sleep(0.2)
                return None
        else:
            async def blocks(context):
                calls.append(1)
                time.sleep(0.2)
                return None

        agent.add_state("blocks", blocks, timeout=0.05, max_retries=1)
        with pytest.raises(StateTimeoutError, match="timed out after 0.05 s"):
            await agent.run()
        assert calls == [1, 1]
        assert agent.state_metadata["blocks"].status is StateStatus.TIMEOUT

    async def test_timeout_from_resources(self):
        from agent import ResourceRequirements

        agent = Agent("timeouts", isolation="inline")

        async def hang(context):
            await asyncio.Event().wait()

        agent.add_state("hang", hang, resources=ResourceRequirements(cpu_units=0.1, timeout=0.05))
        with pytest.raises(StateTimeoutError):
            await agent.run()
        assert agent.resource_pool.get_state_allocations() == {}

    async def test_error_state_pattern(self):
        log = []
        agent = Agent("compensate", isolation="inline")

        async def critical_operation(context):
            try:
                raise RuntimeError("downstream down")
            except Exception:
                return "handle_error"

        async def handle_error(context):
            log.append("handled")
            return "notification_state"

        async def notification_state(context):
            log.append("notified")

        agent.add_state("critical_operation", critical_operation)
        agent.add_state("handle_error", handle_error)
        agent.add_state("notification_state", notification_state)
        await agent.run()
        assert log == ["handled", "notified"]


class TestRunTimeoutDuringARetryDelay:
    async def test_the_error_names_the_state_still_to_run(self):
        from agent import RunTimeoutError

        async def fails(context):
            raise RuntimeError("again later")

        agent = Agent("delayed", isolation="inline",
                      retry_policy=RetryPolicy(max_retries=3, initial_delay=60.0, jitter=False))
        agent.add_state("fails", fails)
        with pytest.raises(RunTimeoutError) as info:
            await agent.run(timeout=0.2)
        message = str(info.value)
        assert "still running: nothing" in message  # nothing ran at that moment: it waited to retry
        assert "still to run (queued, waiting or retrying): ['fails']" in message


class TestPermanentFailures:
    """A failure that cannot succeed on retry is not retried, unless the policy asks."""

    @staticmethod
    def _unencodable(calls: list):
        async def state(context):
            calls.append(context.attempt)
            context.set_state("handle", object())

        return state

    async def test_not_retried_by_default(self):
        calls: list = []
        agent = Agent("permanent", isolation="inline",
                      retry_policy=RetryPolicy(max_retries=3, initial_delay=0.0))
        agent.add_state("write", self._unencodable(calls))
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        assert calls == [1] and info.value.attempts == 1
        assert info.value.reason.permanent
        assert "retry_permanent=True" in str(info.value)

    async def test_retried_when_the_policy_asks(self):
        calls: list = []
        agent = Agent("permanent", isolation="inline")
        agent.add_state("write", self._unencodable(calls),
                        retry_policy=RetryPolicy(max_retries=2, initial_delay=0.0, retry_permanent=True))
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        assert calls == [1, 2, 3] and info.value.attempts == 3
        assert "retry_permanent=True" not in str(info.value)  # it was retried: its retries ran out

    @pytest.mark.parametrize("on_failure", ["fail", "continue"])
    async def test_the_error_says_the_same_whether_the_run_goes_on_or_not(self, on_failure):
        # With on_failure="continue" the run raises once everything ran: the same class and text.
        calls: list = []
        agent = Agent("permanent", isolation="inline", on_failure=on_failure)
        agent.add_state("write", self._unencodable(calls),
                        retry_policy=RetryPolicy(max_retries=1, initial_delay=0.0, retry_permanent=True))
        with pytest.raises(StateFailedError) as info:
            await agent.run()
        assert calls == [1, 2] and "retry_permanent=True" not in str(info.value)

        async def sleeps(context):
            await asyncio.sleep(30)

        timed = Agent("timed", isolation="inline", on_failure=on_failure)
        timed.add_state("sleeps", sleeps, timeout=0.05)
        with pytest.raises(StateTimeoutError):
            await timed.run()

    def test_the_option_is_validated(self):
        with pytest.raises(InvalidConfigurationError, match="retry_permanent must be True or False"):
            RetryPolicy(retry_permanent="yes")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "reason, permanent",
        [
            (FailureReason("limit", "killed: memory limit"), True),
            (FailureReason("bound", "objects"), True),
            (FailureReason("protocol", "forged hello"), True),
            (FailureReason("cgroup_escape", "left"), True),
            (FailureReason("exception", "x", exception_type="agent.errors.ContextBudgetError"), True),
            (FailureReason("exception", "x", exception_type="ValueError"), False),
            (FailureReason("signal", "SIGKILL", signal=9), False),
            (FailureReason("timeout", "late"), False),
            (FailureReason("exit_code", "3", exit_code=3), False),
        ],
    )
    def test_which_kinds_are_permanent(self, reason, permanent):
        assert reason.kind in FAILURE_KINDS
        assert reason.permanent is permanent
