"""``agent run`` as a user runs it: exit statuses, one-line errors, live output, Ctrl-C and resume."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from agent.checkpoint_store import SQLiteCheckpointStore

from .conftest import CHAIN, release, stop

SPEC_QUICK_START = '''\
from agent import Agent, Context, StateResult

# Create your workflow
agent = Agent("hello_workflow")

async def process_data(context: Context) -> StateResult:
    # Process and store data
    result = "Hello, World!"
    context.set_state("greeting", result)
    return "format_output"  # Next state to execute

async def format_output(context: Context) -> StateResult:
    # Get data from previous state
    greeting = context.get_state("greeting")
    print(f"Result: {greeting}")
    return None  # End workflow

# Add states and run
agent.add_state("process_data", process_data)
agent.add_state("format_output", format_output)
await agent.run()
'''

class TestQuickStart:
    """The API guide's Quick Start, ending in a top-level ``await agent.run()``, runs as written."""

    def test_top_level_await(self, cli):
        cli.write("hello.py", SPEC_QUICK_START)
        done = cli.run("run", "hello.py")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["format_output | Result: Hello, World!"]
        assert "hello_workflow completed" in done.stderr

    def test_file_that_runs_itself_with_isolated_states_and_its_own_classes(self, cli):
        """Functions and classes of the file reach the states' processes by value, and it runs once."""
        cli.write("typed.py", """\
            from dataclasses import dataclass
            from agent import Agent, TypedContextData

            @dataclass
            class Point(TypedContextData):
                x: int

            agent = Agent("typed", isolation="process")

            async def make(context):
                context.set_typed("p", Point(x=3))
                return "use"

            async def use(context):
                print(f"x is {context.get_typed('p', Point).x}")
                return None

            agent.add_state("make", make)
            agent.add_state("use", use)
            agent.run_sync()
        """)
        done = cli.run("run", "typed.py")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["use | x is 3"]
        assert done.stderr.count("started typed") == 1


class TestLiveOutput:
    """An isolated state's lines reach the terminal as they are printed, prefixed, and stay in its log."""

    def test_lines_arrive_while_the_state_runs(self, cli):
        proc = cli.start_talker()
        try:
            assert proc.poll() is None  # the state is still blocked: its first line came live
            release(cli.dir / "go")
            out, err = proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == 0, err
        assert out.splitlines() == ["talk | second", "talk | no newline at the end"]
        [log] = list(cli.log_dir.glob("*/talk.attempt-1.log"))
        assert log.read_text() == "first\nsecond\nno newline at the end"

    def test_quiet_keeps_output_in_the_log_only(self, cli):
        cli.write("hello.py", SPEC_QUICK_START)
        done = cli.run("run", "hello.py", "--quiet")
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
        [log] = list(cli.log_dir.glob("*/format_output.attempt-1.log"))
        assert log.read_text() == "Result: Hello, World!\n"

    def test_a_retried_attempt_shows_its_output_and_why(self, cli):
        cli.write("flaky.py", """\
            import os
            from agent import Agent, RetryPolicy

            agent = Agent("flaky_flow", retry_policy=RetryPolicy(max_retries=1, initial_delay=0.0, jitter=False))

            async def flaky(context):
                marker = os.environ["MARKER"]
                first = not os.path.exists(marker)
                open(marker, "a").close()
                print("try 1" if first else "try 2")
                if first:
                    raise RuntimeError("the first try fails")
                return None

            agent.add_state("flaky", flaky)
        """)
        cli.env["MARKER"] = str(cli.dir / "marker")
        done = cli.run("run", "flaky.py")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["flaky | try 1", "flaky#2 | try 2"]
        assert "flaky: attempt 1 failed (RuntimeError: the first try fails); retrying" in done.stderr

    def test_json_summary_keeps_stdout_parseable(self, cli):
        cli.write("hello.py", SPEC_QUICK_START)
        done = cli.run("run", "hello.py", "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["status"] == "completed" and summary["counts"]["completed"] == 2
        assert summary["states"] == {"process_data": "completed", "format_output": "completed"}
        assert "format_output | Result: Hello, World!" in done.stderr


class TestUsageErrors:
    """A wrong command line is one line on stderr and status 2, and creates nothing."""

    @pytest.mark.parametrize("args,message", [
        (["run", "missing.py"], "agent run: missing.py: no such file"),
        (["run", "."], "agent run: . is a directory"),
        (["run", "hello.py", "--timeout", "-5"], "agent run: argument --timeout: must be a number of seconds > 0"),
        (["run", "hello.py", "--timeout", "nan"], "agent run: argument --timeout: must be a number of seconds > 0"),
        (["run", "hello.py", "--frobnicate"], "agent run: unrecognized arguments: --frobnicate"),
        (["frobnicate"], "agent: argument COMMAND: invalid choice: 'frobnicate'"),
        (["runs", "--store", "missing.sqlite3"], "agent runs: no checkpoint store at missing.sqlite3"),
        (["run", "hello.py", "--store", "missing.sqlite3", "--no-store"],
         "agent run: argument --no-store: not allowed with argument --store"),
        (["run"], "agent run: the following arguments are required: file ("),
        # An empty value is a mistake (an unset variable), never "not given".
        (["run", ""], "agent run: argument file: expected the workflow file (a Python file), got an empty string"),
        (["run", "hello.py", "--resume", ""],
         "agent run: argument --resume: expected a run id (`agent runs` lists them), got an empty string"),
        (["run", "hello.py", "--store", ""],
         "agent run: argument --store: expected the path of an SQLite file, got an empty string"),
        (["run", "hello.py", "--agent", ""],
         "agent run: argument --agent: expected an agent's name, got an empty string"),
        (["runs", ""], "agent runs: argument file: expected the workflow file (a Python file), got an empty string"),
        (["runs", "--store", ""],
         "agent runs: argument --store: expected the path of an SQLite store, got an empty string"),
        (["runs", "--agent", ""], "agent runs: argument --agent: expected an agent's name, got an empty string"),
    ])
    def test_one_line(self, cli, args, message):
        cli.write("hello.py", SPEC_QUICK_START)
        done = cli.run(*args)
        assert done.returncode == 2
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr
        assert done.stdout == ""
        assert not (cli.dir / "missing.sqlite3").exists()

    @pytest.mark.parametrize("extra", [[], ["--resume", "deadbeef"]])
    def test_a_store_in_a_missing_directory_creates_nothing(self, cli, extra):
        """`--store` creates its file, never a directory: a mistyped path is a usage error."""
        cli.write("hello.py", SPEC_QUICK_START.replace("await agent.run()\n", ""))
        done = cli.run("run", "hello.py", "--store", "nodir/sub/runs.sqlite3", *extra)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == ("agent run: --store nodir/sub/runs.sqlite3: no directory nodir/sub: create it first, "
                               "or give a file in an existing directory\n")
        assert not (cli.dir / "nodir").exists()
        assert not cli.state_dir.exists() or not any(cli.state_dir.glob("*.sqlite3"))

    def test_resume_of_an_unknown_run_creates_no_store(self, cli):
        cli.write("hello.py", SPEC_QUICK_START.replace("await agent.run()\n", ""))
        done = cli.run("run", "hello.py", "--resume", "deadbeef")
        assert done.returncode == 2
        assert "no run 'deadbeef'" in done.stderr and len(done.stderr.splitlines()) == 1
        assert not cli.state_dir.exists() or not any(cli.state_dir.glob("*.sqlite3"))

    def test_resume_of_an_unknown_run_in_an_existing_store(self, cli):
        cli.write("hello.py", SPEC_QUICK_START.replace("await agent.run()\n", ""))
        assert cli.run("run", "hello.py").returncode == 0
        done = cli.run("run", "hello.py", "--resume", "deadbeef")
        assert done.returncode == 2
        assert "no checkpoint for run 'deadbeef'" in done.stderr and len(done.stderr.splitlines()) == 1

    def test_resume_of_an_unknown_run_in_a_given_store_creates_nothing(self, cli):
        cli.write("hello.py", SPEC_QUICK_START.replace("await agent.run()\n", ""))
        assert cli.run("run", "hello.py", "--store", "runs.sqlite3").returncode == 0
        shutil.rmtree(cli.state_dir)
        done = cli.run("run", "hello.py", "--store", "runs.sqlite3", "--resume", "deadbeef")
        assert done.returncode == 2 and "no checkpoint for run 'deadbeef'" in done.stderr
        assert not cli.state_dir.exists()  # not even the index of stores: the store was only read

    def test_resume_from_an_empty_store_file_leaves_it_empty(self, cli):
        # It wrote the store's schema into the file before finding no such run there.
        cli.write("hello.py", SPEC_QUICK_START.replace("await agent.run()\n", ""))
        (cli.dir / "empty.sqlite3").write_bytes(b"")
        done = cli.run("run", "hello.py", "--store", "empty.sqlite3", "--resume", "deadbeef")
        assert done.returncode == 2 and "no run 'deadbeef': there is no checkpoint store at" in done.stderr
        assert (cli.dir / "empty.sqlite3").read_bytes() == b""

    def test_resume_of_another_agents_run_says_whose_it_is(self, cli):
        built = SPEC_QUICK_START.replace("await agent.run()\n", "")
        cli.write("hello.py", built)
        cli.write("other.py", built.replace('"hello_workflow"', '"other"'))
        done = cli.run("run", "hello.py", "--json", "--store", "runs.sqlite3")
        run_id = json.loads(done.stdout)["run_id"]
        done = cli.run("run", "other.py", "--store", "runs.sqlite3", "--resume", run_id)
        assert done.returncode == 2
        assert "belongs to agent 'hello_workflow', not 'other'" in done.stderr and len(done.stderr.splitlines()) == 1

    def test_resume_of_a_completed_run_runs_nothing_and_succeeds(self, cli):
        cli.write("hello.py", SPEC_QUICK_START.replace("await agent.run()\n", ""))
        first = json.loads(cli.run("run", "hello.py", "--json").stdout)
        run_id = first["run_id"]
        done = cli.run("run", "hello.py", "--json", "--resume", run_id)
        assert done.returncode == 0, done.stderr
        # The summary's documented fields, as a script reading ["counts"] expects them.
        document = json.loads(done.stdout)
        assert document.keys() == first.keys() | {"resumed"}
        assert document["resumed"] is False and document["elapsed"] is None
        for key in ("agent", "run_id", "status", "counts", "states", "failed", "error", "store", "resume_command",
                    "context_keys"):
            assert document[key] == first[key], key
        assert f"run {run_id} had completed: nothing to resume" in done.stderr
        assert "Result:" not in done.stderr  # nothing ran again

    def test_resume_refused_for_a_file_that_runs_its_agent_when_loaded(self, cli):
        cli.write("hello.py", SPEC_QUICK_START)
        done = cli.run("run", "hello.py", "--resume", "deadbeef")
        assert done.returncode == 2 and "runs its agent itself when loaded" in done.stderr

    @pytest.mark.parametrize("command", [[], ["run"], ["runs"], ["top"], ["doctor"]])
    def test_every_command_has_real_help(self, cli, command):
        done = cli.run(*command, "--help")
        assert done.returncode == 0, done.stderr
        assert "usage: agent" in done.stdout and "rest" not in done.stdout
        expected = {(): "run", ("run",): "--resume", ("runs",): "--store", ("top",): "--once",
                    ("doctor",): "--json"}[tuple(command)]
        assert expected in done.stdout

    @pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["top", "--help"]])
    def test_help_and_version_do_not_import_asyncio(self, cli, argv):
        probe = ("import sys\nfrom agent.cli import main\nmain(sys.argv[1:])\n"
                 "print('asyncio' in sys.modules, file=sys.stderr)\n")
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                              timeout=60, cwd=cli.dir, env=cli.env)
        assert done.stderr.strip().splitlines()[-1] == "False", done.stderr


class TestClosedStandardStreams:
    """A program started with a standard descriptor closed (``<&-``, ``>&-``, ``2>&-``) runs as
    with it open: the next socket took that number, a state's output was written over its
    channel, and uvloop aborted the whole program as it closed that socket (SIGABRT, 134)."""

    FLOW = """\
        import os
        from agent import Agent

        agent = Agent("closed", isolation="process")

        async def first(context):
            print("to the closed stream, or not", flush=True)
            return "second"

        async def second(context):
            with open(os.environ["DONE"], "a") as fh:
                fh.write("second ran\\n")

        agent.add_state("first", first)
        agent.add_state("second", second)

        if __name__ == "__main__":
            if os.environ.get("OWN_LOOP"):  # made where the closed descriptor was free
                import asyncio
                asyncio.run(agent.run())
            else:
                agent.run_sync()
    """

    @pytest.mark.parametrize("closed", [0, 1, 2], ids=["stdin", "stdout", "stderr"])
    @pytest.mark.parametrize("how", ["agent run", "python", "python, asyncio.run"])
    def test_the_run_completes(self, cli, closed, how):
        cli.write("flow.py", self.FLOW)
        done_file = cli.dir / "done.txt"
        command = cli.command("run", "flow.py") if how == "agent run" else [sys.executable, "flow.py"]
        if how == "python, asyncio.run":
            cli.env["OWN_LOOP"] = "1"
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cli.dir,
                              env=dict(cli.env, DONE=str(done_file)), preexec_fn=lambda: os.close(closed))
        assert done.returncode == 0, (done.returncode, done.stderr)
        assert done_file.read_text() == "second ran\n"


class TestOutputGone:
    """Whatever it prints, a reader that went away ends it with 141 and a full disk with one line."""

    @pytest.mark.parametrize("args", [["--version"], ["--help"], ["run", "--help"], ["runs"]])
    def test_a_reader_that_went_away(self, cli, args):
        # --help and --version ended with a BrokenPipeError traceback and status 1.
        read, write = os.pipe()
        os.close(read)  # gone before anything is written: every write fails
        try:
            done = subprocess.run(cli.command(*args), stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                                  cwd=cli.dir, env=cli.env, stdin=subprocess.DEVNULL)
        finally:
            os.close(write)
        assert done.returncode == 141, done.stderr
        assert done.stderr == ""

    @pytest.mark.parametrize("args", [["--help"], ["runs"]])
    def test_a_full_disk(self, cli, args):
        with open("/dev/full", "w") as full:
            done = subprocess.run(cli.command(*args), stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
                                  cwd=cli.dir, env=cli.env, stdin=subprocess.DEVNULL)
        assert done.returncode == 1
        assert done.stderr == "agent: cannot write its output: No space left on device\n"


class TestNamesOnTheTerminal:
    def test_an_agent_name_that_would_break_the_line_or_drive_the_terminal_is_escaped(self, cli):
        # Printed raw, in agent run's notices and agent runs' table, it split their lines and
        # reached the terminal as an escape sequence (agent top wrote it out already).
        cli.write("evil.py", """\
            from agent import Agent
            agent = Agent("evil\\nname\\x1b[31mRED", isolation="inline")
            async def s(context):
                return None
            agent.add_state("s", s)
        """)
        done = cli.run("run", "evil.py")
        assert done.returncode == 0, done.stderr
        listed = cli.run("runs").stdout
        for text in (done.stderr, listed):
            assert "\x1b" not in text and "evil\\nname\\x1b[31mRED" in text


class TestLoadErrors:
    """A file that cannot be loaded shows the user's own traceback and exits 3."""

    def test_syntax_error(self, cli):
        cli.write("broken.py", "from agent import Agent\nagent = Agent('x'\n")
        done = cli.run("run", "broken.py")
        assert done.returncode == 3
        assert 'broken.py", line 2' in done.stderr and "SyntaxError" in done.stderr
        assert "Traceback" not in done.stderr

    def test_import_error_shows_only_the_users_frames(self, cli):
        cli.write("needs.py", "from agent import Agent\nimport helper_that_is_missing\n")
        done = cli.run("run", "needs.py")
        assert done.returncode == 3
        lines = done.stderr.splitlines()
        assert lines[0] == "agent run: cannot load needs.py:"
        assert lines[1] == "Traceback (most recent call last):"
        assert 'needs.py", line 2, in <module>' in lines[2]
        assert lines[-1] == "ModuleNotFoundError: No module named 'helper_that_is_missing'"
        assert "cli" not in done.stderr and "runpy" not in done.stderr and "importlib" not in done.stderr

    def test_framework_error_while_building(self, cli):
        cli.write("greedy.py", """\
            from agent import Agent, ResourceRequirements
            agent = Agent("greedy")
            async def s(context):
                return None
            agent.add_state("s", s, resources=ResourceRequirements(cpu_units=100_000))
        """)
        done = cli.run("run", "greedy.py")
        assert done.returncode == 3
        assert 'greedy.py", line 5, in <module>' in done.stderr
        assert done.stderr.rstrip().splitlines()[-1].startswith("agent.errors.ResourceRequestError: state 's'")
        # None of the framework's own frames: by path, nor by a compiled module's relative name.
        assert "/agent/" not in done.stderr and 'File "agent/' not in done.stderr

    @pytest.mark.parametrize("code,shown", [
        ('"usage: flow.py CONFIG"', "(sys.exit('usage: flow.py CONFIG')): usage: flow.py CONFIG"),
        ("5", "(sys.exit(5))"),
        ("0", "(sys.exit(0))"),
    ])
    def test_an_exit_before_any_run(self, cli, code, shown):
        # Its status was passed on (1, 5, even 0 for no run at all) and its message dropped.
        cli.write("flow.py", f"import sys\nfrom agent import Agent\nagent = Agent('early')\nsys.exit({code})\n")
        done = cli.run("run", "flow.py")
        assert done.returncode == 3
        assert done.stderr == f"agent run: flow.py exited while it was loaded, before any run {shown}\n"

    @pytest.mark.parametrize("source,message", [
        ("x = 1\n", "defines no Agent at module level"),
        ("from agent import Agent\nagent = Agent('empty')\n", "agent 'empty' has no states"),
    ])
    def test_nothing_to_run(self, cli, source, message):
        cli.write("flow.py", source)
        done = cli.run("run", "flow.py")
        assert done.returncode == 3
        assert message in done.stderr and len(done.stderr.splitlines()) == 1
        assert done.stdout == ""


class TestWorkflowArguments:
    """The workflow's own arguments (its sys.argv[1:]) go after --, or beside the options."""

    ARGV = """\
        import sys
        from agent import Agent
        agent = Agent("argv", isolation="inline")
        async def s(context):
            raise ValueError(repr(sys.argv[1:]))
        agent.add_state("s", s)
    """

    @pytest.mark.parametrize("args", [
        ["argv.py", "--json", "--", "a", "-b"],
        ["argv.py", "a", "--json", "--", "-b"],
        ["argv.py", "--json", "a", "--", "-b"],
    ])
    def test_after_the_options_and_in_the_resume_command(self, cli, args):
        cli.write("argv.py", self.ARGV)
        done = cli.run("run", *args)
        summary = json.loads(done.stdout)
        assert done.returncode == 1 and "ValueError: ['a', '-b']" in summary["error"]
        assert summary["resume_command"].endswith(f"--resume {summary['run_id']} -- a -b")


class TestOutcomes:
    """The exit status says how the run ended; the summary says why."""

    def test_failed_run(self, cli):
        cli.write("broken.py", """\
            from agent import Agent
            agent = Agent("broken", isolation="inline")
            async def s(context):
                raise ValueError("no good")
            agent.add_state("s", s)
        """)
        done = cli.run("run", "broken.py")
        assert done.returncode == 1
        assert "broken failed after" in done.stderr and "ValueError: no good" in done.stderr
        assert "resume it with: agent run broken.py --resume " in done.stderr  # once fixed, at what failed

    def test_the_resume_command_can_be_pasted_and_keeps_the_runs_bounds(self, cli):
        # Quoted where a shell would split it; the isolation and timeout given are kept.
        cli.write("my flow.py", FAILS_UNTIL_FIXED)
        done = cli.run("run", "my flow.py", "--store", "my runs.sqlite3", "--isolation", "inline",
                       "--timeout", "1")
        assert done.returncode == 1
        (command,) = [line.split("resume it with: ")[1] for line in done.stderr.splitlines()
                      if "resume it with" in line]
        argv = shlex.split(command)
        assert argv[:9] == ["agent", "run", "my flow.py", "--store", "my runs.sqlite3", "--isolation", "inline",
                            "--timeout", "1"]
        (cli.dir / "fixed").write_text("")  # now the failed state runs past the timeout
        done = cli.run(*argv[1:])
        assert done.returncode == 1 and "did not finish within its timeout" in done.stderr, done.stderr
        assert "first ran" not in done.stdout  # what completed is not run again

    def test_an_isolated_states_traceback_points_at_the_file(self, cli):
        # Its code travels by value (cloudpickle names it "<dynamic-code>"); the state's
        # process gives it the file back, for the module `agent run` loads it as too.
        path = cli.write("broken.py", """\
            from agent import Agent
            agent = Agent("broken", isolation="process")
            def helper():
                raise ValueError("no good")
            async def s(context):
                helper()
            agent.add_state("s", s)
        """)
        done = cli.run("run", "broken.py")
        assert done.returncode == 1
        assert f'File "{path}", line 4, in helper' in done.stderr, done.stderr
        assert 'raise ValueError("no good")' in done.stderr
        assert "<dynamic-code>" not in done.stderr

    def test_guarded_run_is_run_by_the_command_once(self, cli):
        cli.write("guarded.py", SPEC_QUICK_START.replace(
            "await agent.run()", 'if __name__ == "__main__":\n    agent.run_sync()'))
        done = cli.run("run", "guarded.py", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["format_output | Result: Hello, World!"]
        assert done.stderr.count("started hello_workflow") == 1


    @pytest.mark.parametrize("level", ["inline", "worker", "process"])
    def test_isolation_is_overridden_to_every_level(self, cli, level):
        cli.write("guarded.py", SPEC_QUICK_START.replace("await agent.run()", ""))
        done = cli.run("run", "guarded.py", "--isolation", level, "--json", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "completed"


FAILS_UNTIL_FIXED = """
import asyncio, os
from agent import Agent

agent = Agent("fixable")

async def first(context):
    print("first ran")
    return "second"

async def second(context):
    if not os.path.exists("fixed"):
        raise ValueError("not fixed yet")
    await asyncio.sleep(600)

agent.add_state("first", first)
agent.add_state("second", second)
"""


PRINTER = """
import asyncio
from agent import Agent

agent = Agent("printer")

async def chatty(context):
    for i in range(20_000):
        print("line", i)
    await asyncio.sleep(600)  # still running when its reader goes away

agent.add_state("chatty", chatty)
"""


class TestReaderGone:
    """``agent run flow.py | head``: the run is paused as for SIGTERM, and the command exits 141."""

    @pytest.mark.parametrize("isolation", ["inline", "process"])
    def test_the_run_pauses_and_exits_141(self, cli, isolation):
        cli.write("printer.py", PRINTER)
        proc = cli.start("run", "printer.py", "--isolation", isolation)
        try:
            assert all("line" in proc.stdout.readline() for _ in range(3))
            proc.stdout.close()  # as head does once it has its lines
            err = proc.stderr.read()
            proc.wait(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == 141, err
        assert "printer paused after" in err
        assert f"resume it with: agent run printer.py --isolation {isolation} --resume" in err  # where it ran
        assert "BrokenPipeError" not in err and "Traceback" not in err


BRANCH_CANCELLED = """
import asyncio
from agent import Agent

agent = Agent("branches", isolation="inline")

async def start(context):
    return ["b", "c"]

async def b(context):
    await asyncio.sleep(0.05)
    agent.cancel_state("c")  # c's branch ends here: it never runs again
    print("c cancelled", flush=True)
    await asyncio.sleep(600)

async def c(context):
    await asyncio.sleep(600)

agent.add_state("start", start, next_states=["b", "c"])
agent.add_state("b", b)
agent.add_state("c", c)
"""


class TestPausedSummary:
    """A paused run's summary says which states run again on resume, and only those."""

    def test_a_branch_cancelled_before_the_pause_stays_cancelled(self, cli):
        cli.write("branches.py", BRANCH_CANCELLED)
        proc = cli.start("run", "--json", "branches.py")
        try:
            while "c cancelled" not in proc.stderr.readline():  # --json: the workflow prints to stderr
                pass
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == 143, err
        summary = json.loads(out)
        assert summary["states"] == {"start": "completed", "b": "pending", "c": "cancelled"}
        assert (summary["counts"]["to_run_again"], summary["counts"]["cancelled"]) == (1, 1)

    def test_output_and_errors_to_a_reader_that_goes_pause_the_run_too(self, cli):
        # agent run flow.py 2>&1 | head: its own notices meet the broken pipe as well.
        cli.write("printer.py", PRINTER)
        proc = subprocess.Popen(cli.command("run", "printer.py", "--isolation", "inline"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, cwd=cli.dir,
                                env=cli.env)
        try:
            while "line" not in proc.stdout.readline():
                pass
            proc.stdout.close()
            proc.wait(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == 141
        [run] = json.loads(cli.run("runs", "--json").stdout)
        assert run["status"] == "paused"


class TestInterrupt:
    """Ctrl-C (or SIGTERM, as systemd stops a service) pauses the run, marks it paused in its
    store and prints how to resume it."""

    @pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                             ids=["ctrl-c", "sigterm"])
    def test_pause_then_resume(self, cli, sig, status):
        cli.write("flow.py", CHAIN)
        effects = cli.dir / "effects"
        cli.env.update(EFFECTS=str(effects), HANG="1", GO=str(cli.fifo("go")), AGENT_STOP_GRACE="0.2")
        proc = cli.start("run", "flow.py")
        try:
            assert proc.stdout.readline() == "transform | transform is waiting\n"
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == status, err
        run_id = err.split("run id ")[1].split()[0]
        assert f"resume it with: agent run flow.py --resume {run_id}" in err
        # The state it stopped runs again on resume: not called cancelled.
        assert "paused after" in err and "completed, 1 to run again (run" in err and "cancelled" not in err
        with SQLiteCheckpointStore(cli.state_dir / "checkpoints.sqlite3") as store:
            assert store.latest(run_id).agent_status == "paused"

        del cli.env["HANG"]
        done = cli.run("run", "flow.py", "--resume", run_id)
        assert done.returncode == 0, done.stderr
        assert effects.read_text().split() == ["extract", "transform", "transform", "load"]  # extract ran once
        listed = json.loads(cli.run("runs", "--json").stdout)
        assert [(r["run_id"], r["status"]) for r in listed] == [(run_id, "completed")]


    @pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                             ids=["ctrl-c", "sigterm"])
    def test_a_run_the_file_runs_as_it_loads_is_stopped_and_reported(self, cli, sig, status):
        # Also where the command starts with SIGINT ignored (a shell's background job; CI's
        # runner): Ctrl-C and SIGTERM still stop it.
        # agent.run_sync() at module level runs while the command loads the file.
        cli.write("loading.py", """\
            import asyncio
            from agent import Agent

            agent = Agent("loading", isolation="process")

            async def s0(context):
                print("running", flush=True)
                await asyncio.sleep(600)

            agent.add_state("s0", s0)
            agent.run_sync()
        """)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the command
        try:
            proc = cli.start("run", "loading.py", "--no-progress")
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            while "running" not in proc.stdout.readline():
                pass
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == status, err
        assert "agent run: loading stopped after" in err, err  # reported, as a run the command drives

    def test_a_state_waiting_on_the_stopped_one_is_pending_not_blocked(self, cli):
        # s1 depends on s0, which Ctrl-C stops: s1 runs on resume, as s0 does.
        cli.write("deps.py", """\
            import asyncio
            from agent import Agent

            agent = Agent("deps", isolation="process")

            async def s0(context):
                print("running", flush=True)
                await asyncio.sleep(600)

            async def s1(context):
                return None

            agent.add_state("s0", s0)
            agent.add_state("s1", s1, dependencies=["s0"])
        """)
        cli.env.update(AGENT_STOP_GRACE="0.2")
        proc = cli.start("run", "deps.py", "--json", "--no-progress")
        try:
            while "running" not in proc.stderr.readline():  # --json: the workflow prints to stderr
                pass
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == 130, err
        summary = json.loads(out)
        assert summary["status"] == "paused" and summary["states"] == {"s0": "pending", "s1": "pending"}
        assert summary["counts"].get("blocked", 0) == 0 and "is blocked" not in err

    @pytest.mark.parametrize("ending", ["await agent.run()", "agent.run_sync()"])
    def test_a_file_that_exits_after_its_run_has_the_run_reported(self, cli, ending):
        cli.write("exits.py", f"""\
            import sys
            from agent import Agent

            agent = Agent("exits", isolation="inline")

            async def s0(context):
                return None

            agent.add_state("s0", s0)
            {ending}
            sys.exit(5)
        """)
        done = cli.run("run", "exits.py", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "completed"

    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
    def test_a_second_signal_while_a_state_stops_keeps_the_run_paused(self, cli, sig):
        # systemctl stop, twice: of two branches, `quick` stops a second after SIGTERM and
        # `stubborn` ignores it, so both are still stopping (for AGENT_STOP_GRACE) when the
        # second signal stops the command at once. Both run again on resume.
        cli.write("flow.py", """\
            import os, signal, time
            from agent import Agent
            agent = Agent("stopping", isolation="process")
            def effect(name):
                with open(os.environ["EFFECTS"], "a") as fh:
                    fh.write(name + "\\n")
            async def start(context):
                return ["quick", "stubborn"]
            async def quick(context):
                effect("quick")
                if os.environ.get("HANG"):  # takes a second to stop: after the second signal
                    signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), os._exit(1)))
                    print("quick is waiting", flush=True)
                    time.sleep(600)
            async def stubborn(context):
                effect("stubborn")
                if os.environ.get("HANG"):
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    print("stubborn is waiting", flush=True)
                    time.sleep(600)
            agent.add_state("start", start)
            agent.add_state("quick", quick)
            agent.add_state("stubborn", stubborn)
        """)
        effects = cli.dir / "effects"
        cli.env.update(EFFECTS=str(effects), HANG="1", AGENT_STOP_GRACE="60")
        proc = cli.start("run", "flow.py")
        try:
            waiting = {proc.stdout.readline().partition("| ")[2] for _ in range(2)}  # once both wait
            assert waiting == {"stubborn is waiting\n", "quick is waiting\n"}
            proc.send_signal(sig)
            err = ""
            while "pausing" not in err:
                line = proc.stderr.readline()
                assert line, proc.communicate()
                err += line
            proc.send_signal(sig)
            err += proc.communicate(timeout=60)[1]
        finally:
            stop(proc)
        assert "stopping now" in err
        run_id = err.split("run id ")[1].split()[0]
        with SQLiteCheckpointStore(cli.state_dir / "checkpoints.sqlite3") as store:
            assert store.latest(run_id).agent_status == "paused"

        del cli.env["HANG"]
        done = cli.run("run", "flow.py", "--resume", run_id)
        assert done.returncode == 0, done.stderr
        assert sorted(effects.read_text().split()) == ["quick", "quick", "stubborn", "stubborn"]  # both again


class TestHumanInput:
    """A question nobody can answer on this terminal is said, not waited on in silence."""

    @pytest.mark.parametrize("options", [[], ["--no-progress"]], ids=["progress", "no-progress"])
    def test_notice_for_a_pending_question(self, cli, options):
        cli.write("asks.py", """\
            from agent import Agent
            agent = Agent("asks", isolation="inline")
            async def ask(context):
                await context.human_in_the_loop("Ship it? (yes/no)", timeout=None)
                return None
            agent.add_state("ask", ask)
        """)
        proc = cli.start("run", "asks.py", *options)
        try:
            line = ""
            while "waits for an answer" not in line:
                line = proc.stderr.readline()
                assert line, proc.communicate()
            assert "ask waits for an answer to 'Ship it? (yes/no)'" in line
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == 130


def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly(cli):
    """`agent top --json | head`: no traceback, the status a SIGPIPE would have given."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(cli.command("top", "--json"), stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=60, env=cli.env)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")
