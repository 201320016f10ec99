"""Context: plain values, defaults, and typed data with real type checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Generic, List, Optional, TypeVar

import pytest

from agent import Context, ContextKeyError, ContextTypeError, TypedContextData, UnencodableValueError


@dataclass
class UserProfile(TypedContextData):
    name: str
    age: int
    scores: List[float]


@dataclass
class Nested(TypedContextData):
    tags: Dict[str, List[int]] = field(default_factory=dict)
    note: Optional[str] = None


@dataclass
class Other(TypedContextData):
    value: int


T = TypeVar("T")


@dataclass
class Box(TypedContextData, Generic[T]):
    item: T


class TestPlainValues:
    """set/get/remove/has behave like a dict with defaults."""

    def test_set_get_remove_has(self):
        ctx = Context()
        ctx.set_state("user_name", "Alice")
        ctx.set_state("scores", [95, 87, 92])
        assert ctx.get_state("user_name") == "Alice"
        assert ctx.get_state("missing") is None
        assert ctx.get_state("missing", default=[]) == []
        assert ctx.remove_state("user_name") is True
        assert ctx.remove_state("user_name") is False
        assert not ctx.has_state("user_name")
        assert ctx.has_state("scores")
        assert ctx.keys() == ["scores"]

    def test_non_str_key_is_rejected(self):
        with pytest.raises(ContextTypeError, match="keys are strings"):
            Context().set_state(3, "x")  # type: ignore[arg-type]

    def test_views_share_one_store(self):
        ctx = Context()
        view = ctx.view(state_name="s1")
        view.set_state("k", 1)
        assert ctx.get_state("k") == 1
        assert view.state_name == "s1"

    def test_write_hook_sees_every_write(self):
        seen = []
        ctx = Context(on_write=lambda k, v, deleted: seen.append((k, v, deleted)))
        ctx.set_state("a", 1)
        ctx.remove_state("a")
        assert seen == [("a", 1, False), ("a", None, True)]


@dataclass
class Holder(TypedContextData):
    profile: UserProfile
    others: List[UserProfile] = field(default_factory=list)


@dataclass
class Counted(TypedContextData):
    total: int
    seen: int = field(default=0, init=False)


@dataclass
class Bag(TypedContextData):
    items: list


class TestNestedTypedValues:
    """Typed data inside typed data is checked against its own class too, at any depth."""

    def test_a_bad_nested_field_is_refused_naming_its_path(self):
        ctx = Context()
        with pytest.raises(ContextTypeError, match=r"context key 'h'.profile: UserProfile.age must be int, got str"):
            ctx.set_typed("h", Holder(profile=UserProfile(name="a", age="x", scores=[])))  # type: ignore[arg-type]
        ctx.set_typed("h", Holder(profile=UserProfile(name="a", age=1, scores=[1.0])))
        bad = UserProfile(name="b", age=2, scores=["high"])  # type: ignore[list-item]
        with pytest.raises(ContextTypeError, match=r"'h'.others\[0\]: UserProfile.scores must be List\[float\]"):
            ctx.update_typed("h", others=[bad])
        assert ctx.get_typed("h", Holder).others == []

    def test_a_deep_or_cyclic_field_is_refused_naming_the_key(self):
        # Bounded as set_state bounds it, before the fields are checked: no RecursionError.
        deep: list = []
        for _ in range(5000):
            deep = [deep]
        cycle: list = []
        cycle.append(cycle)
        ctx = Context()
        for value in (deep, cycle):
            with pytest.raises(UnencodableValueError, match=r"context key 'b'.*nested deeper than 64 levels"):
                ctx.set_typed("b", Bag(items=value))
        ctx.set_typed("b", Bag(items=[1]))
        with pytest.raises(UnencodableValueError, match=r"context key 'b'.*nested deeper than 64 levels"):
            ctx.update_typed("b", items=deep)
        assert ctx.get_typed("b", Bag).items == [1]


class TestTypedValues:
    """Typed data is checked against its annotations."""

    def test_round_trip(self):
        ctx = Context()
        ctx.set_typed("user", UserProfile(name="Alice", age=28, scores=[95.0, 87.5]))
        ctx.update_typed("user", age=29)
        user = ctx.get_typed("user", UserProfile)
        assert (user.name, user.age, user.scores) == ("Alice", 29, [95.0, 87.5])

    def test_int_is_accepted_for_float(self):
        ctx = Context()
        ctx.set_typed("user", UserProfile(name="A", age=1, scores=[1, 2.5]))
        assert ctx.get_typed("user", UserProfile).scores == [1, 2.5]

    def test_wrong_field_type_is_rejected_on_set(self):
        with pytest.raises(ContextTypeError, match="UserProfile.age must be int"):
            Context().set_typed("user", UserProfile(name="A", age="28", scores=[]))  # type: ignore[arg-type]

    def test_wrong_element_type_is_rejected(self):
        with pytest.raises(ContextTypeError, match="scores"):
            Context().set_typed("user", UserProfile(name="A", age=1, scores=["x"]))  # type: ignore[list-item]

    def test_nested_generics_and_optional(self):
        ctx = Context()
        ctx.set_typed("n", Nested(tags={"a": [1, 2]}))
        with pytest.raises(ContextTypeError):
            ctx.update_typed("n", tags={"a": ["no"]})
        ctx.update_typed("n", note="ok")
        assert ctx.get_typed("n", Nested).note == "ok"

    def test_set_typed_needs_typed_context_data(self):
        with pytest.raises(ContextTypeError, match="TypedContextData"):
            Context().set_typed("x", {"a": 1})  # type: ignore[arg-type]

    def test_get_typed_wrong_class(self):
        ctx = Context()
        ctx.set_typed("o", Other(value=1))
        with pytest.raises(ContextTypeError, match="holds Other, not UserProfile"):
            ctx.get_typed("o", UserProfile)

    def test_get_typed_of_a_generic_class(self):
        ctx = Context()
        ctx.set_typed("b", Box(item=3))
        assert ctx.get_typed("b", Box[int]) == Box(item=3)  # Box[int] is a Box
        with pytest.raises(ContextTypeError, match="holds Box, not Other"):
            ctx.get_typed("b", Other)
        with pytest.raises(ContextTypeError, match="takes a TypedContextData class, got 'Box'"):
            ctx.get_typed("b", "Box")  # type: ignore[arg-type]

    def test_get_typed_missing_key(self):
        with pytest.raises(ContextKeyError, match="no typed value under 'nope'"):
            Context().get_typed("nope", Other)

    def test_update_typed_rejects_unknown_fields(self):
        ctx = Context()
        ctx.set_typed("o", Other(value=1))
        with pytest.raises(ContextTypeError, match="no field"):
            ctx.update_typed("o", colour="red")
        assert ctx.get_typed("o", Other).value == 1

    def test_update_typed_rejects_wrong_type(self):
        ctx = Context()
        ctx.set_typed("o", Other(value=1))
        with pytest.raises(ContextTypeError, match="Other.value must be int"):
            ctx.update_typed("o", value="two")
        assert ctx.get_typed("o", Other).value == 1

    def test_update_typed_of_a_field_made_without_init(self):
        ctx = Context()
        ctx.set_typed("c", Counted(total=1))
        with pytest.raises(ContextTypeError, match=r"update_typed\('c', ...\): Counted: .*init=False"):
            ctx.update_typed("c", seen=2)
        assert ctx.get_typed("c", Counted) == Counted(total=1)

    def test_bool_is_not_an_int(self):
        with pytest.raises(ContextTypeError):
            Context().set_typed("o", Other(value=True))


class TestValueModel:
    """Every write is checked against the one value model and counted against the budget."""

    def test_a_value_outside_the_model_is_refused_and_not_stored(self):
        from agent.errors import UnencodableValueError

        ctx = Context()
        with pytest.raises(UnencodableValueError, match="context key 'when'.*cannot be stored"):
            ctx.set_state("when", object())
        assert "when" not in ctx and ctx.budget.used == 0

    def test_the_budget_counts_replacements_and_removals(self):
        from agent.errors import ContextBudgetError

        ctx = Context(budget=1000)
        ctx.set_state("a", b"x" * 600)
        ctx.set_state("a", b"x" * 900)  # replaces: still within
        with pytest.raises(ContextBudgetError, match="context key 'b'.*over its budget of 1,000 bytes"):
            ctx.set_state("b", b"x" * 200)
        ctx.remove_state("a")
        ctx.set_state("b", b"x" * 200)
        assert ctx.budget.used == ctx.budget.sizes["b"] < 1000

    def test_views_share_the_budget(self):
        ctx = Context(budget=10_000)
        ctx.view(state_name="s").set_state("k", "v" * 100)
        assert ctx.budget.used > 100


class TestValuesAreCopies:
    """Changing a stored value in place is not a write, in any isolation level (DESIGN 7-8):
    the store keeps its own copy, and hands out copies of what could be changed."""

    def test_the_callers_object_and_what_is_handed_out_are_not_the_store(self):
        ctx = Context()
        scores = [1, 2]
        ctx.set_state("scores", scores)
        scores.append(3)
        ctx.get_state("scores").append(4)
        ctx.to_dict()["scores"].append(5)
        assert ctx.get_state("scores") == [1, 2]
        profile = UserProfile(name="a", age=29, scores=[1.0])
        ctx.set_typed("user", profile)
        ctx.get_typed("user", UserProfile).age = "twenty-nine"  # type: ignore[assignment]
        ctx.get_typed("user", UserProfile).scores.append(2.0)
        profile.scores.append(3.0)
        assert ctx.get_typed("user", UserProfile) == UserProfile(name="a", age=29, scores=[1.0])

    def test_values_that_cannot_change_are_not_copied(self):
        ctx = Context()
        text, frozen = "x" * 100, (1, "a", (2, 3))
        ctx.set_state("text", text)
        ctx.set_state("frozen", frozen)
        assert ctx.get_state("text") is text and ctx.get_state("frozen") is frozen

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    async def test_a_value_changed_in_place_cannot_smuggle_anything_in(self, isolation: str):
        from agent import Agent

        async def first(context):
            context.get_state("d")["b"] = object()  # outside the model: never stored
            context.get_state("xs").append(3)
            return "second"

        async def second(context):
            context.set_state("seen", [context.get_state("d"), context.get_state("xs")])

        agent = Agent("in_place", isolation=isolation)
        agent.add_state("first", first)
        agent.add_state("second", second)
        initial = {"d": {"a": 1}, "xs": [1, 2]}
        ctx = await agent.run(initial_context=initial)
        initial["xs"].append(99)
        assert ctx.get_state("seen") == [{"a": 1}, [1, 2]]
        assert ctx.get_state("xs") == [1, 2]
        assert agent.state_metadata["second"].status.value == "completed"
