"""A question's arguments are checked where it is asked, alike at every isolation level;
a human's text has a size limit that every provider and every level keeps."""

from __future__ import annotations

import asyncio

import pytest

from agent import Agent, Context, HumanInputError, HumanInputTimeoutError, InvalidConfigurationError, ValueTooLargeError
from agent.human import MAX_TEXT, HumanInputRequest, QueueInputProvider, ask_human

LEVELS = ("inline", "process", "worker")

BAD = [
    # (id, keyword arguments, error type, words in the message)
    ("prompt None", {"prompt": None}, "InvalidConfigurationError", "prompt must be a str"),
    ("timeout str", {"timeout": "5"}, "InvalidConfigurationError", "str '5'"),
    ("timeout bool", {"timeout": True}, "InvalidConfigurationError", "bool True"),
    ("timeout negative", {"timeout": -1}, "InvalidConfigurationError", ">= 0"),
    ("validator not callable", {"validator": 5}, "InvalidConfigurationError", "must be callable"),
    ("default int", {"default": 5}, "InvalidConfigurationError", "default must be a str"),
    ("prompt too long", {"prompt": "x" * (MAX_TEXT + 1)}, "ValueTooLargeError", "character limit"),
    # It would reject every answer, each with a TypeError, and the default would come back.
    ("validator taking no answer", {"validator": lambda: True}, "InvalidConfigurationError",
     "must take one argument"),
    ("validator taking two", {"validator": lambda x, y: True}, "InvalidConfigurationError", "must take one argument"),
    ("prompt a lone surrogate", {"prompt": "ok?\ud800"}, "InvalidConfigurationError", "UTF-8 can encode"),
    ("default a lone surrogate", {"default": "\udcff"}, "InvalidConfigurationError", "default must be text"),
]


def asking(kwargs: dict, isolation: str) -> Agent:
    async def asks(context: Context):
        arguments = {"prompt": "ok?", "timeout": 5, **kwargs}
        try:
            await context.human_in_the_loop(**arguments)
        except Exception as exc:  # what the state's code can catch
            context.set_state("caught", [type(exc).__name__, str(exc)])
            return None
        context.set_state("caught", None)

    async def after(context: Context):
        context.set_state("after", True)

    agent = Agent("asks", isolation=isolation, human_input=QueueInputProvider())
    agent.add_state("asks", asks)
    agent.add_state("after", after, dependencies=["asks"])
    return agent


class TestBadArguments:
    @pytest.mark.parametrize("kwargs,error,words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
    async def test_refused_at_the_call_alike_at_every_level(self, kwargs, error, words):
        caught = {}
        for isolation in LEVELS:
            agent = asking(kwargs, isolation)
            context = await agent.run()
            caught[isolation] = context.get_state("caught")
            assert context.get_state("after") is True  # the run went on
        assert caught["inline"][0] == error and words in caught["inline"][1]
        assert caught["process"] == caught["inline"] and caught["worker"] == caught["inline"]


class _Answers:
    """A provider answering from a list; records what each request said."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.requests: list[HumanInputRequest] = []

    async def ask(self, request: HumanInputRequest) -> str:
        self.requests.append(request)
        return self.answers.pop(0)


class TestLongAnswers:
    async def test_the_queue_refuses_an_answer_over_the_limit_and_keeps_the_question(self):
        provider = QueueInputProvider()
        asked = asyncio.create_task(ask_human(provider, "ok?", timeout=10))
        request = await provider.wait_for_request()
        with pytest.raises(ValueTooLargeError, match="character limit"):
            provider.answer(request.id, "x" * (MAX_TEXT + 1))
        assert [r.id for r in provider.pending()] == [request.id]
        provider.answer(request.id, "yes")
        assert await asked == "yes"

    @pytest.mark.parametrize("isolation", LEVELS)
    async def test_an_answer_over_the_limit_is_asked_again(self, isolation):
        provider = _Answers("x" * (MAX_TEXT + 1), "short")
        agent = Agent("long_answer", isolation=isolation, human_input=provider)

        async def asks(context: Context):
            context.set_state("answer", await context.human_in_the_loop("ok?", timeout=30))

        agent.add_state("asks", asks)
        assert (await agent.run()).get_state("answer") == "short"
        second = provider.requests[1]
        assert second.attempt == 2 and "character limit" in second.rejected
        assert second.id == provider.requests[0].id

    async def test_a_timeout_after_rejected_answers_says_they_were_rejected(self):
        class Slow(_Answers):
            async def ask(self, request):
                if len(self.requests) >= 3:
                    await asyncio.Event().wait()  # the fourth question is never answered
                return await super().ask(request)

        slow = Slow("no", "no", "no")
        with pytest.raises(HumanInputTimeoutError, match=r"no valid answer to 'n\?' within 0.2 s: 3 rejected"):
            await ask_human(slow, "n?", timeout=0.2, validator=str.isdigit)


def test_a_validator_that_is_not_callable_is_refused_before_asking():
    provider = _Answers("1")
    with pytest.raises(InvalidConfigurationError, match="callable"):
        asyncio.run(ask_human(provider, "n?", validator="isdigit"))
    assert provider.requests == []


async def is_digit_somewhere(answer: str) -> bool:
    await asyncio.sleep(0)  # as one that looks the answer up would
    return answer.isdigit()


@pytest.mark.parametrize("isolation", LEVELS)
async def test_an_async_validator_is_awaited_at_every_level(isolation):
    # Its coroutine was taken for a true answer: every answer passed, unchecked.
    provider = _Answers("garbage", "7")
    agent = Agent("async_validator", isolation=isolation, human_input=provider)

    async def asks(context: Context):
        context.set_state("answer", await context.human_in_the_loop("n?", timeout=30, validator=is_digit_somewhere))

    agent.add_state("asks", asks)
    assert (await agent.run()).get_state("answer") == "7"
    assert [r.attempt for r in provider.requests] == [1, 2]
    assert provider.requests[1].rejected == "'garbage' is not valid"


@pytest.mark.parametrize("isolation", LEVELS)
async def test_an_answer_equal_to_the_default_is_validated_at_every_level(isolation):
    """A human who types the default text is checked like any answer: a child took it for
    the provider's fallback and returned it unchecked."""
    provider = _Answers("maybe", "yes")
    agent = Agent("typed_the_default", isolation=isolation, human_input=provider)

    async def asks(context: Context):
        answer = await context.human_in_the_loop("y/n?", timeout=30, validator=lambda a: a in ("yes", "no"),
                                                 default="maybe")
        context.set_state("answer", answer)

    agent.add_state("asks", asks)
    assert (await agent.run()).get_state("answer") == "yes"
    assert [(r.attempt, r.rejected) for r in provider.requests] == [(1, None), (2, "'maybe' is not valid")]


@pytest.mark.parametrize("isolation", LEVELS)
async def test_a_timeout_after_a_rejected_answer_says_so_at_every_level(isolation):
    """The time is up while the validator looks: a child said only "within 0.5 s and no
    default", without the state or the rejection."""
    agent = Agent("slow_validator", isolation=isolation, human_input=_Answers("abc"))

    async def slow_digits(answer: str) -> bool:
        await asyncio.sleep(0.7)
        return answer.isdigit()

    async def asks(context: Context):
        try:
            await context.human_in_the_loop("num?", timeout=0.5, validator=slow_digits)
        except HumanInputTimeoutError as exc:
            context.set_state("error", str(exc))

    agent.add_state("asks", asks)
    assert (await agent.run()).get_state("error") == (
        "no valid answer to 'num?' within 0.5 s (state 'asks'): 1 rejected (last: 'abc' is not valid); "
        "pass default= or a longer timeout")


@pytest.mark.parametrize("isolation", LEVELS)
async def test_a_default_still_answers_when_the_time_is_up_at_every_level(isolation):
    class Never(_Answers):
        async def ask(self, request):
            self.requests.append(request)
            await asyncio.Event().wait()

    agent = Agent("nobody_there", isolation=isolation, human_input=Never())

    async def asks(context: Context):
        context.set_state("answer", await context.human_in_the_loop("go?", timeout=0.2, default="later"))

    agent.add_state("asks", asks)
    assert (await agent.run()).get_state("answer") == "later"


class TestTextUTF8CannotEncode:
    async def test_the_queue_refuses_it_and_keeps_the_question(self):
        provider = QueueInputProvider()
        asking = asyncio.ensure_future(ask_human(provider, "name?", timeout=30))
        while not provider.pending():
            await asyncio.sleep(0.01)
        request = provider.pending()[0]
        with pytest.raises(HumanInputError, match="UTF-8 can encode"):
            provider.answer(request.id, "bad \ud800 text")  # as json.loads('"\\ud800"') gives
        provider.answer(request.id, "Ada")
        assert await asking == "Ada"

    async def test_another_provider_s_such_answer_is_asked_again(self):
        provider = _Answers("bad \udcff", "ok")
        assert await ask_human(provider, "name?", timeout=30) == "ok"
        assert "UTF-8 can encode" in provider.requests[1].rejected


async def test_a_provider_whose_ask_is_not_async_is_told_so():
    class Plain:
        def ask(self, request):
            return "x"

    with pytest.raises(HumanInputError, match=r"ask\(\) must be async: Plain.ask returned str"):
        await ask_human(Plain(), "name?", timeout=5)
