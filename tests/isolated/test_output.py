"""Isolated states' output: echoed live with the state's name, kept in unique log files, pruned."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from agent import Agent, InvalidConfigurationError, WorkflowDefinitionError
from agent.supervisor import output
from agent.supervisor.logs import AttemptLogs, LogRetention, file_component


class Echo(list):
    """What the supervisor echoes, as (label, line) pairs; ``await grown(n)`` waits for n of them."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def __call__(self, label: str, lines: list[str]) -> None:
        self.extend((label, line) for line in lines)
        for n, future in self._waiters:
            if len(self) >= n and not future.done():
                future.set_result(None)

    async def grown(self, n: int) -> None:
        if len(self) < n:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((n, future))
            await future


@pytest.fixture
def echoed():
    """The echo of isolated states' output, instead of the terminal."""
    seen = Echo()
    output.set_writer(seen)
    yield seen
    output.set_writer(output.default_writer())


class TestEcho:
    """Lines reach the writer while the state runs, in order, with the state's name."""

    async def test_live_and_prefixed(self, echoed):
        agent = Agent("echo")

        async def talk(context):
            import sys

            print("to stdout", flush=True)
            print("to stderr", file=sys.stderr, flush=True)
            await context.human_in_the_loop("echoed?", timeout=60)  # answered once both were echoed
            print("partial", end="")
            return None

        class AnswerWhenEchoed:
            seen_then: list[tuple[str, str]] = []

            async def ask(self, request):
                await echoed.grown(2)
                self.seen_then = list(echoed)
                return "yes"

        provider = AnswerWhenEchoed()
        agent.human_input = provider
        agent.add_state("talk", talk)
        await agent.run()
        assert provider.seen_then == [("talk", "to stdout"), ("talk", "to stderr")]  # while it ran
        assert echoed == [("talk", "to stdout"), ("talk", "to stderr"), ("talk", "partial")]
        assert agent.logs("talk") == "to stdout\nto stderr\npartial"

    async def test_retries_are_labelled(self, echoed):
        from agent import RetryPolicy

        agent = Agent("labelled", retry_policy=RetryPolicy(max_retries=1, initial_delay=0.0, jitter=False))

        async def flaky(context):
            attempt = context.get_state("tries", 0) + 1
            context.set_state("tries", attempt)
            print(f"attempt {attempt}")
            if attempt == 1:
                raise RuntimeError("again")
            return None

        agent.add_state("flaky", flaky)
        await agent.run()
        assert echoed == [("flaky", "attempt 1"), ("flaky#2", "attempt 2")]

    def test_prefixed_writer(self, capsys):
        writer = output.PrefixedWriter(lambda: __import__("sys").stdout)
        writer("load", ["a"])
        writer("transform", ["b"])
        writer("load", ["c"])
        assert capsys.readouterr().out == "load | a\ntransform | b\nload      | c\n"


    def test_a_name_that_would_break_the_line_or_drive_the_terminal_is_escaped(self, capsys):
        # A state name holds any str: printed raw, "a\nb" forged a line of its own and
        # "\x1b[2J" cleared the user's screen.
        writer = output.PrefixedWriter(lambda: __import__("sys").stdout)
        writer("a\nb", ["x"])
        writer("\x1b[2J", ["y"])
        assert capsys.readouterr().out == "a\\nb | x\n\\x1b[2J | y\n"


class TestLogFiles:
    """One file per attempt, never shared between two states, and a name limit."""

    async def test_distinct_names_never_share_a_file(self, echoed):
        agent = Agent("names")
        names = ["a b", "a_b", "a/b"]

        def printer(name):
            async def state(context):
                print(f"I am {name!r}")
                return None
            return state

        for name in names:
            agent.add_state(name, printer(name))
        await agent.run(start=names)
        assert [agent.logs(n) for n in names] == [f"I am {n!r}\n" for n in names]
        assert file_component("a_b") == "a_b"
        assert file_component("a b") != file_component("a/b") and "~" in file_component("a b")
        assert "/" not in file_component("a/b") and file_component("..") not in ("..", ".")

    async def test_longest_name_runs_isolated(self, echoed):
        name = "s" * 255
        agent = Agent("long")

        async def state(context):
            print("long name, short file name")
            return None

        agent.add_state(name, state)
        await agent.run()
        assert agent.logs(name) == "long name, short file name\n"

    @pytest.mark.parametrize("isolation", ["process", "worker"])
    async def test_output_many_times_a_pipe_is_kept_whole(self, echoed, isolation):
        """The child's writes wait while the supervisor's pipe is full: none is lost."""
        async def loud(context):
            for i in range(20_000):
                print(f"line {i:05d} " + "y" * 60)
            return None

        agent = Agent("loud", isolation=isolation)
        agent.add_state("loud", loud)
        await agent.run()
        lines = agent.logs("loud").splitlines()
        assert len(lines) == 20_000 and lines[0].startswith("line 00000") and lines[-1].startswith("line 19999")

    def test_name_over_255_bytes_is_refused(self):
        agent = Agent("too_long")

        async def state(context):
            return None

        with pytest.raises(WorkflowDefinitionError, match="300 bytes long; the limit is 255"):
            agent.add_state("x" * 300, state)
        with pytest.raises(WorkflowDefinitionError, match="the limit is 255"):
            agent.add_state("é" * 128, state)  # 256 bytes of UTF-8
        with pytest.raises(WorkflowDefinitionError, match="lone surrogate"):
            agent.add_state(b"report-\xff".decode("utf-8", "surrogateescape"), state)  # as os.listdir names it


class TestRetention:
    """Finished logs are kept within a count, a size and an age; the oldest go first."""

    def finish(self, logs: AttemptLogs, run: str, state: str, attempt: int, text: str,
               ended: float | None = None) -> str:
        path, fd = logs.open(run, state, attempt)
        os.write(fd, text.encode())
        os.close(fd)
        logs.finished(path, len(text), ended=ended)
        return path

    def test_by_count(self, tmp_path):
        logs = AttemptLogs(str(tmp_path), LogRetention(max_files=3))
        paths = [self.finish(logs, "run1", f"s{i}", 1, "x") for i in range(5)]
        assert [os.path.exists(p) for p in paths] == [False, False, True, True, True]

    def test_by_when_the_attempt_ended_not_when_its_log_was_filed(self, tmp_path):
        """A log filed late (its process took longer to exit than the next attempts took to
        end) is as old as its attempt: it goes before theirs."""
        logs = AttemptLogs(str(tmp_path), LogRetention(max_files=2))
        start = time.time() - 10
        first = self.finish(logs, "run1", "s1", 1, "x", ended=start + 1)
        ended = {name: self.finish(logs, "run1", name, 1, "x", ended=start + t)
                 for name, t in (("s2", 2), ("s3", 3))}
        filed_late = self.finish(logs, "run1", "s0", 1, "x", ended=start)
        assert not os.path.exists(first) and not os.path.exists(filed_late)
        assert all(os.path.exists(p) for p in ended.values())

    def test_by_size_and_empty_run_folders_go(self, tmp_path):
        logs = AttemptLogs(str(tmp_path), LogRetention(max_bytes=10))
        first = self.finish(logs, "run1", "s", 1, "1234567")
        second = self.finish(logs, "run2", "s", 1, "1234567")
        assert not os.path.exists(first) and os.path.exists(second)
        assert sorted(os.listdir(tmp_path)) == ["run2"]

    def test_the_newest_log_stays_even_when_it_alone_is_over_the_byte_budget(self, tmp_path):
        logs = AttemptLogs(str(tmp_path), LogRetention(max_bytes=10))
        first = self.finish(logs, "run1", "s", 1, "x" * 20)
        assert os.path.exists(first)  # what its user reads next
        second = self.finish(logs, "run2", "s", 1, "x" * 20)
        assert not os.path.exists(first) and os.path.exists(second)

    def test_by_age(self, tmp_path):
        logs = AttemptLogs(str(tmp_path), LogRetention(max_age=3600))
        old = self.finish(logs, "run1", "s", 1, "old")
        logs._kept[0] = (time.time() - 7200, *logs._kept[0][1:])  # finished two hours ago
        new = self.finish(logs, "run1", "s", 2, "new")
        assert not os.path.exists(old) and os.path.exists(new)

    def test_logs_of_earlier_processes_count(self, tmp_path):
        earlier = AttemptLogs(str(tmp_path), LogRetention(float("inf"), float("inf"), float("inf")))
        left = [self.finish(earlier, "old", f"s{i}", 1, "x") for i in range(4)]
        AttemptLogs(str(tmp_path), LogRetention(max_files=2))
        assert [os.path.exists(p) for p in left] == [False, False, True, True]

    async def test_the_supervisor_applies_it(self, tmp_path, monkeypatch, echoed):
        """Six isolated attempts with AGENT_LOG_MAX_FILES=3: the three newest logs are left."""
        from agent.supervisor import shutdown_supervisor

        monkeypatch.setenv("AGENT_LOG_DIR", str(tmp_path))
        monkeypatch.setenv("AGENT_LOG_MAX_FILES", "3")
        shutdown_supervisor()  # the next isolated attempt starts one that reads these settings
        try:
            agent = Agent("many")

            def step(i):
                async def state(context):
                    print(f"step {i}")
                    return f"s{i + 1}" if i < 5 else None
                return state

            for i in range(6):
                agent.add_state(f"s{i}", step(i))
            await agent.run()
            left = sorted(p.name for p in tmp_path.glob("*/*.log"))
        finally:
            shutdown_supervisor()
        assert left == ["s3.attempt-1.log", "s4.attempt-1.log", "s5.attempt-1.log"]

    @pytest.mark.parametrize("variable,value,limit", [
        ("AGENT_LOG_MAX_FILES", "500", ("max_files", 500)),
        ("AGENT_LOG_MAX_BYTES", "64M", ("max_bytes", 64 * 1024**2)),
        ("AGENT_LOG_MAX_AGE", "2h", ("max_age", 7200)),
        ("AGENT_LOG_MAX_AGE", "off", ("max_age", float("inf"))),
    ])
    def test_from_environment(self, monkeypatch, variable, value, limit):
        monkeypatch.setenv(variable, value)
        assert getattr(LogRetention.from_env(), limit[0]) == limit[1]

    @pytest.mark.parametrize("value", ["lots", "10 parsecs", "-5"])
    def test_bad_environment(self, monkeypatch, value):
        monkeypatch.setenv("AGENT_LOG_MAX_BYTES", value)
        with pytest.raises(InvalidConfigurationError, match="AGENT_LOG_MAX_BYTES"):
            LogRetention.from_env()
