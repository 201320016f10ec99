"""``add_state(..., context_keys=[...])``: a state sees and writes only the keys it is given."""

from __future__ import annotations

from typing import Any

import pytest

from agent import Agent, Context
from agent.errors import ContextKeyError, ContextScopeError, InvalidConfigurationError, StateFailedError
from agent.executor import Isolation
from agent.scope import ContextScope, ScopedContext, scope_for


async def reads_and_writes(context: Context) -> None:
    seen = sorted(context.keys())
    context.set_state("result_total", context.get_state("input_a") + context.get_state("input_b"))
    context.set_state("seen", seen)


async def reads_a_secret(context: Context) -> None:
    context.get_state("api_key")


class TestContextScope:
    """Names match exactly; a trailing '*' matches a prefix."""

    def test_names_and_prefixes(self) -> None:
        scope = ContextScope(["result", "input_*"])
        assert scope.allows("result") and scope.allows("input_") and scope.allows("input_rows")
        assert not scope.allows("results") and not scope.allows("inpu") and not scope.allows("api_key")

    def test_the_empty_scope_allows_nothing(self) -> None:
        assert not ContextScope(()).allows("")

    def test_who_gets_which_scope(self) -> None:
        assert scope_for(Isolation.SANDBOX, None).patterns == ()  # type: ignore[union-attr]
        assert scope_for(Isolation.PROCESS, None) is None
        assert scope_for(Isolation.INLINE, None) is None
        assert scope_for(Isolation.INLINE, ("a",)).patterns == ("a",)  # type: ignore[union-attr]

    def test_a_scoped_view_hides_and_refuses_other_keys(self) -> None:
        store = Context({"input_a": 1, "api_key": "k"}, state_name="s")
        view = ScopedContext.over(store, ContextScope(["input_*", "out"]))
        assert view.keys() == ["input_a"] and view.to_dict() == {"input_a": 1} and len(view) == 1
        assert view.get_state("input_a") == 1 and view.get_state("input_zzz", 5) == 5
        for call in (lambda: view.get_state("api_key"), lambda: view.set_state("api_key", 1),
                     lambda: "api_key" in view, lambda: view.remove_state("api_key"),
                     lambda: view.has_state("api_key")):
            with pytest.raises(ContextScopeError, match="may not .* context key 'api_key'"):
                call()
        view.set_state("out", 2)
        assert store.get_state("out") == 2
        assert isinstance(ContextScopeError("x"), ContextKeyError)


class TestAddState:
    """context_keys is checked when the state is added."""

    @pytest.mark.parametrize("bad", ["input", [1], [""], ["a*b"], 5])
    def test_bad_context_keys_are_refused(self, bad: Any) -> None:
        agent = Agent("scoped", isolation="inline")
        with pytest.raises(InvalidConfigurationError, match="context_keys"):
            agent.add_state("s", reads_and_writes, context_keys=bad)


class TestEveryIsolationLevel:
    """A given scope holds inline and in a process too; without one they see everything."""

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_a_scoped_state_sees_only_its_keys(self, isolation: str) -> None:
        agent = Agent("scoped", isolation=isolation)
        agent.add_state("sum", reads_and_writes, context_keys=["input_*", "result_*", "seen"])
        run = await agent.run(initial_context={"input_a": 1, "input_b": 2, "api_key": "k"})
        assert run.get_state("result_total") == 3
        assert run.get_state("seen") == ["input_a", "input_b"]

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_a_key_outside_the_scope_fails_the_state(self, isolation: str) -> None:
        agent = Agent("scoped", isolation=isolation)
        agent.add_state("peek", reads_a_secret, context_keys=["input_*"], max_retries=3)
        with pytest.raises(StateFailedError, match="may not read context key 'api_key'") as failed:
            await agent.run(initial_context={"api_key": "k"})
        # It would fail the same way again: permanent, not retried.
        assert failed.value.reason.permanent and failed.value.attempts == 1

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_without_context_keys_everything_is_seen(self, isolation: str) -> None:
        agent = Agent("open", isolation=isolation)
        agent.add_state("peek", reads_a_secret)
        await agent.run(initial_context={"api_key": "k"})
