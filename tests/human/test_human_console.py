"""The console provider reads a terminal (or pipe) on the event loop, without threads."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import sys
import threading

import pytest

from agent.errors import HumanInputError
from agent.human import (
    ConsoleInputProvider,
    HumanInputRequest,
    PipedInputProvider,
    QueueInputProvider,
    ask_human,
    default_provider,
    process_queue,
)


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def terminal():
    master, slave = pty.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def request(prompt: str = "Approve?", **kw) -> HumanInputRequest:
    return HumanInputRequest(id="r1", prompt=prompt, **kw)


class TestConsoleInputProvider:
    """Prompts go to the output; one line of input is one answer."""

    async def test_reads_a_line_from_a_terminal(self, terminal):
        master, slave = terminal
        out = io.StringIO()
        provider = ConsoleInputProvider(input_fd=slave, output=out)
        task = asyncio.create_task(provider.ask(request(state="review", default="no", timeout=30)))
        os.write(master, b"yes\n")
        assert await task == "yes"
        assert out.getvalue() == "[review] Approve? (default 'no', 30s) > "

    async def test_lines_arriving_together_answer_successive_questions(self, pipe):
        read_fd, write_fd = pipe
        provider = ConsoleInputProvider(input_fd=read_fd, output=io.StringIO())
        os.write(write_fd, b"first\r\nsecond\n")
        assert await provider.ask(request()) == "first"
        assert await provider.ask(request()) == "second"

    async def test_line_split_across_writes(self, pipe):
        read_fd, write_fd = pipe
        provider = ConsoleInputProvider(input_fd=read_fd, output=io.StringIO())
        task = asyncio.create_task(provider.ask(request()))
        os.write(write_fd, b"hal")
        await asyncio.sleep(0)
        os.write(write_fd, "f réponse\n".encode())
        assert await task == "half réponse"

    async def test_end_of_input_is_an_error(self, pipe):
        read_fd, write_fd = pipe
        provider = ConsoleInputProvider(input_fd=read_fd, output=io.StringIO())
        os.close(write_fd)
        with pytest.raises(HumanInputError, match="closed"):
            await provider.ask(request())

    async def test_timeout_leaves_the_console_usable(self, pipe, clock):
        read_fd, write_fd = pipe
        out = io.StringIO()
        provider = ConsoleInputProvider(input_fd=read_fd, output=out)
        task = asyncio.create_task(ask_human(provider, "q1", timeout=5, default="d", clock=clock))
        while "q1" not in out.getvalue():  # the prompt is written before the read starts
            await asyncio.sleep(0)
        await clock.advance(5)
        assert await task == "d"
        os.write(write_fd, b"answer\n")
        assert await provider.ask(request("q2")) == "answer"

    async def test_rejected_answer_is_shown_and_asked_again(self, pipe, clock):
        read_fd, write_fd = pipe
        out = io.StringIO()
        provider = ConsoleInputProvider(input_fd=read_fd, output=out)
        os.write(write_fd, b"abc\n42\n")
        answer = await ask_human(provider, "Enter score (0-100):", validator=str.isdigit, clock=clock)
        assert answer == "42"
        assert "'abc' is not valid; please answer again." in out.getvalue()
        assert out.getvalue().count("Enter score (0-100):") == 2

    async def test_concurrent_questions_are_asked_one_at_a_time(self, pipe):
        read_fd, write_fd = pipe
        out = io.StringIO()
        provider = ConsoleInputProvider(input_fd=read_fd, output=out)
        first = asyncio.create_task(provider.ask(request("one")))
        second = asyncio.create_task(provider.ask(request("two")))
        while "one" not in out.getvalue():
            await asyncio.sleep(0)
        assert "two" not in out.getvalue()
        os.write(write_fd, b"1\n2\n")
        assert (await first, await second) == ("1", "2")

    async def test_no_thread_is_used(self, pipe):
        read_fd, write_fd = pipe
        provider = ConsoleInputProvider(input_fd=read_fd, output=io.StringIO())
        before = threading.active_count()
        task = asyncio.create_task(provider.ask(request()))
        await asyncio.sleep(0)
        assert threading.active_count() == before
        os.write(write_fd, b"ok\n")
        assert await task == "ok"


class TestDefaultProvider:
    """The console on a terminal; a pipe or a file and the queue at once; else the queue."""

    def test_queue_when_stdin_can_carry_no_answer(self, monkeypatch):
        monkeypatch.setattr(sys, "stdin", open(os.devnull))
        provider = default_provider()
        assert isinstance(provider, QueueInputProvider)
        assert provider is process_queue() is default_provider()
        sys.stdin.close()

    def test_pipe_and_queue_when_stdin_is_a_pipe(self, pipe, monkeypatch):
        monkeypatch.setattr(sys, "stdin", os.fdopen(os.dup(pipe[0]), "r"))
        provider = default_provider()
        assert isinstance(provider, PipedInputProvider)
        assert provider.queue is process_queue() and provider is default_provider()
        sys.stdin.close()

    def test_console_when_stdin_is_a_terminal(self, terminal, monkeypatch):
        monkeypatch.setattr(sys, "stdin", os.fdopen(os.dup(terminal[1]), "r"))
        provider = default_provider()
        assert isinstance(provider, ConsoleInputProvider)
        assert provider is default_provider()
        sys.stdin.close()


class TestPipedInput:
    """``echo approve | python flow.py``: the pipe answers; code can too; after its end, code alone."""

    async def test_the_pipe_answers(self, pipe):
        read_fd, write_fd = pipe
        queue = QueueInputProvider()
        provider = PipedInputProvider(ConsoleInputProvider(input_fd=read_fd, output=io.StringIO()), queue)
        os.write(write_fd, b"approve\n")
        assert await provider.ask(request()) == "approve"
        assert queue.pending() == []

    async def test_code_answers_while_the_pipe_is_silent(self, pipe):
        read_fd, _ = pipe
        queue = QueueInputProvider()
        provider = PipedInputProvider(ConsoleInputProvider(input_fd=read_fd, output=io.StringIO()), queue)
        task = asyncio.create_task(provider.ask(request()))
        asked = await queue.wait_for_request()
        queue.answer(asked.id, "from code")
        assert await task == "from code"

    async def test_after_the_end_of_input_code_answers(self, pipe):
        read_fd, write_fd = pipe
        out = io.StringIO()
        queue = QueueInputProvider()
        provider = PipedInputProvider(ConsoleInputProvider(input_fd=read_fd, output=out), queue)
        os.write(write_fd, b"first\n")
        os.close(write_fd)
        assert await provider.ask(request("one")) == "first"
        for prompt in ("two", "three"):  # each waits in the queue, asked once on the console
            task = asyncio.create_task(provider.ask(request(prompt)))
            asked = await queue.wait_for_request()
            queue.answer(asked.id, prompt.upper())
            assert await task == prompt.upper()
        assert out.getvalue().count("two") == 1 and "three" not in out.getvalue()

    async def test_a_question_that_times_out_leaves_nothing_waiting(self, pipe, clock):
        read_fd, write_fd = pipe
        queue = QueueInputProvider()
        provider = PipedInputProvider(ConsoleInputProvider(input_fd=read_fd, output=io.StringIO()), queue)
        task = asyncio.create_task(ask_human(provider, "q", timeout=5, default="d", clock=clock))
        await queue.wait_for_request()
        await clock.advance(5)
        assert await task == "d"
        assert queue.pending() == []
        os.write(write_fd, b"later\n")
        assert await provider.ask(request("next")) == "later"
