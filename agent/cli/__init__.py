"""The ``agent`` command: run a workflow file, list and watch runs, inspect this machine.

Every subcommand's options are declared here, so ``agent X --help`` shows them all; a
command's modules (and asyncio with them) are imported only when it runs, so ``agent
--help`` and ``agent --version`` stay instant. A wrong command line is one line on
stderr and exit status 2; the statuses are :class:`~agent.cli.exit_codes.ExitCode`.
The reference is ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .exit_codes import ExitCode

__all__ = ["ExitCode", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exits with ExitCode.USAGE."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _given(what: str) -> Callable[[str], str]:
    """An option's text, refused when empty: ``--resume ""`` (a variable that was not set)
    must not read as "not given" and start a new run, nor ``--store ""`` pick the default."""

    def given(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty string")
        return text

    return given


RUN_HELP = """\
Load FILE, a Python file that defines an Agent at module level, and run it: live output
of each state (prefixed with its name), a progress line, and a summary at the end.
A file may also run its agent itself (top-level `await agent.run()`, as in the Quick
Start, or `agent.run_sync()`); then that run is watched and reported. The file is
loaded as a module, not as __main__: an `if __name__ == "__main__":` block is skipped.

Each run is saved to a checkpoint store (the agent's own, else --store, else
$AGENT_STATE_DIR/checkpoints.sqlite3): Ctrl-C pauses the run and prints the command
that resumes it; a second Ctrl-C stops at once.

exit status: 0 completed, 1 failed, 2 usage error, 3 the file cannot be loaded or
defines no runnable agent, 4 cancelled, 130 Ctrl-C and 143 SIGTERM (paused: resumable),
141 the reader of its output went away (paused too).
"""

RUNS_HELP = """\
List the runs saved in checkpoint stores, newest first, to resume one with
`agent run FILE --resume RUN_ID`. Without FILE or --store: the default store and every
store this user's programs have opened (they are remembered in $AGENT_STATE_DIR/stores).
With FILE: the store its agent uses, as `agent run FILE` would. A run saved as running
that no live process reports is shown as interrupted.
"""

TOP_HELP = """\
Watch the runs of every process of this user on this machine (each process that runs
agents answers on a private status socket), and the runs saved in checkpoint stores.
"""


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = _Parser(prog="agent", description="Run, watch and inspect agent workflows.")
    parser.add_argument("--version", action="version", version=f"agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run the Agent a workflow file defines", description=RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("file", type=_given("the workflow file (a Python file)"),
                     help="the workflow file (Python); arguments for it (its sys.argv[1:]) go after --")
    run.add_argument("--agent", type=_given("an agent's name"), metavar="NAME",
                     help="which agent, when the file defines several")
    run.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="fail the run after this long")
    run.add_argument("--isolation", choices=["inline", "worker", "process", "sandbox", "ray"],
                     help="override the agent's isolation")
    run.add_argument("--resume", type=_given("a run id (`agent runs` lists them)"), metavar="RUN_ID",
                     help="continue this run from its last checkpoint")
    saving = run.add_mutually_exclusive_group()
    saving.add_argument("--store", type=_given("the path of an SQLite file"), metavar="PATH",
                        help="the checkpoint store (SQLite file) for an agent without one; its directory must exist")
    saving.add_argument("--no-store", action="store_true", help="do not save the run (it cannot be resumed)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (output goes to stderr)")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="no state output and no progress on the terminal (still in the attempt logs)")
    run.add_argument("--no-progress", action="store_true", help="no progress line (state output still shown)")
    run.set_defaults(handler="agent.cli.run:run_command")

    runs = sub.add_parser("runs", help="list saved runs (to resume one)", description=RUNS_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_argument("file", nargs="?", type=_given("the workflow file (a Python file)"),
                      help="list the runs in the store this workflow file's agent uses")
    runs.add_argument("--store", type=_given("the path of an SQLite store"), metavar="PATH",
                      help="list the runs in this SQLite store only")
    runs.add_argument("--agent", type=_given("an agent's name"), metavar="NAME", help="only runs of this agent")
    runs.add_argument("--limit", type=_count, default=20, metavar="N", help="at most N runs per store (default 20)")
    runs.add_argument("--json", action="store_true", help="print JSON (times as epoch seconds)")
    runs.set_defaults(handler="agent.cli.runs:runs_command")

    top = sub.add_parser("top", help="watch live runs of this user, and recent ones", description=TOP_HELP)
    top.add_argument("--once", "--snapshot", dest="once", action="store_true", help="print one frame and exit")
    top.add_argument("--json", action="store_true", help="print what it sees as JSON and exit")
    top.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS", help="refresh period (default 1)")
    top.add_argument("--width", type=_count, metavar="COLUMNS", help="render width (default: the terminal's)")
    top.add_argument("--demo", action="store_true", help="run demo workflows in this process and watch them")
    top.add_argument("--speed", type=_seconds, default=1.0, help="demo speed-up factor (default 1)")
    top.add_argument("--demo-isolation", dest="isolation", choices=["inline", "worker", "process", "sandbox"],
                     default="inline", help="isolation of the demo's states (default inline)")
    top.set_defaults(handler="agent.monitor.top:top_command")

    doctor = sub.add_parser("doctor", help="what this machine can enforce (cgroups, GPUs, sandbox)",
                            description="Report what this machine can enforce: cgroup limits, GPUs, sandbox.")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(handler="agent.cli:_doctor")
    return parser


def _doctor(args: argparse.Namespace) -> int:
    from ..supervisor.doctor import main as doctor_main

    return doctor_main(["--json"] if args.json else [])


def _before_dashes(argv: list[str]) -> list[str]:
    """``agent run``'s own arguments: those before the first ``--`` (what follows is the workflow's)."""
    if len(argv) > 1 and argv[0] == "run" and "--" in argv:
        return argv[: argv.index("--")]
    return argv


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agent`` command; returns the exit status."""
    from .._stdio import open_standard_streams

    open_standard_streams()  # `agent run flow.py >&-`: see agent._stdio
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return _main(parser, argv)
    except BrokenPipeError:  # `agent top --json | head`, `agent --help | head`: the reader left
        _stdout_to_null()
        return ExitCode.READER_GONE  # as a command the pipe's signal would have ended
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        _stdout_to_null()  # else the interpreter's last flush fails the same way
        print(f"agent: cannot write its output: {exc.strerror}", file=sys.stderr)
        return ExitCode.RUN_FAILED


def _stdout_to_null() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _main(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    try:
        own = _before_dashes(argv)
        args, extra = parser.parse_known_args(own)
        if args.command == "run":
            # The workflow's own arguments: after --, and any plain word beside the options.
            args.args = [a for a in extra if not a.startswith("-")] + argv[len(own) + 1:]
            extra = [a for a in extra if a.startswith("-")]
        if extra:  # said by the subcommand, whose --help lists what it takes
            _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return int(exc.code or 0) if isinstance(exc.code, int) else ExitCode.USAGE
    module_name, _, function = args.handler.partition(":")
    import importlib

    handler = getattr(importlib.import_module(module_name), function)
    return int(handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
