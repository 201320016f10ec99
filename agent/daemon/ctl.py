"""agentctl: submit jobs to agentd and watch and steer them.

The socket is ``--socket PATH``, else ``$AGENT_SOCKET``, else ``/run/agent/agentd.sock``.
Every command takes ``--json`` (machine-readable output on stdout). A refusal (an
unknown job, another user's job, a job in the wrong status) prints one line on stderr
and exits non-zero, with the codes below.

A command costs little more than Python's own start: this module imports only ``os``,
``sys`` and :mod:`.protocol` (itself light), and ``agentctl submit FILE`` in its usual
forms is read without argparse (:func:`_quick_submit`); every other command line, and
any submit it does not recognize exactly, goes through the full parser, which gives the
same result or the same usage error as before.
"""

from __future__ import annotations

import os
import sys
import time

from . import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn

EXIT_OK = 0
EXIT_REFUSED = 1  # a job in the wrong status, a failed job when waiting for it, ...
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3  # agentd cannot be reached
EXIT_DENIED = 4  # another user's job, a priority above the ceiling
EXIT_NOT_FOUND = 5  # no such job, state or question
EXIT_VERSION = 6  # agentctl and agentd of different releases
_EXIT_BY_CODE = {
    protocol.DENIED: EXIT_DENIED, protocol.NOT_FOUND: EXIT_NOT_FOUND, protocol.VERSION: EXIT_VERSION,
    protocol.INVALID: EXIT_USAGE, protocol.CONFLICT: EXIT_REFUSED,
}
FOLLOW_INTERVAL = 0.3


class Refused(Exception):
    """agentd refused a request; ``exit_code`` says how."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Client:
    """A control connection to agentd.

    The hello goes out with the first request, in one write, and agentd's welcome is read
    before that request's reply: one round trip instead of two. agentd answers a hello it
    refuses (another protocol version) and closes the connection without reading on, so
    the request behind it is never served.
    """

    def __init__(self, path: str) -> None:
        self.channel = protocol.BlockingChannel(path, timeout=None)
        self.welcome: dict[str, Any] | None = None

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        request = {"op": op, **fields}
        if self.welcome is None:
            self.channel.send(protocol.hello("control"), request)
            welcome = self.channel.receive()
            if welcome.get("op") != "welcome":
                raise Refused(str(welcome.get("error") or welcome),
                              _EXIT_BY_CODE.get(welcome.get("code"), EXIT_REFUSED))
            self.welcome = welcome
        else:
            self.channel.send(request)
        reply = self.channel.receive()
        if not reply.get("ok"):
            raise Refused(str(reply.get("error")), _EXIT_BY_CODE.get(reply.get("code"), EXIT_REFUSED))
        return reply


_JSON_STARTS = frozenset('{["-0123456789tfn')
"""The characters a JSON text can start with (after JSON's own white space)."""


def _param(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        import argparse

        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE, got {text!r}")
    if value.lstrip(" \t\n\r")[:1] not in _JSON_STARTS:
        return name, value  # not JSON (a path, a word): no need to load the json module
    import json

    try:
        return name, json.loads(value)  # numbers, true/false, lists, objects
    except ValueError:
        return name, value  # anything else is a string


def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _progress(job: dict[str, Any]) -> str:
    states = job.get("states") or {}
    done = sum(1 for s in states.values() if s == "completed")
    return f"{done}/{len(states)}"


def _table(jobs: list[dict[str, Any]]) -> str:
    rows = [("JOB", "USER", "NAME", "PRIORITY", "STATUS", "STATES", "AGE")]
    now = time.time()
    for job in jobs:
        rows.append((str(job["job"]), job["user"], job["name"], job["priority"], job["status"],
                     _progress(job), _age(now - job["created"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _describe(job: dict[str, Any]) -> str:
    lines = [f"job {job['job']}: {job['name']} ({job['user']}, priority {job['priority']}) {job['status']}"]
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    waiting = job.get("waiting") or {}
    for name, status in sorted((job.get("states") or {}).items()):
        why = f"  (waiting: {waiting[name]})" if name in waiting else ""
        lines.append(f"  {name:<24} {status}{why}")
    for q in job.get("pending") or []:
        state = f"[{q.get('state')}] " if q.get("state") else ""
        lines.append(f"  question {q['id']}: {state}{q['prompt']}  (agentctl respond {job['job']} {q['id']} ANSWER)")
    return "\n".join(lines)


class _Compiled(Exception):
    """The file compiled: raised at the ``exec`` audit event, before any of it runs."""


_TOP_LEVEL_AWAIT = 0x2000  # ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, without importing ast


class _Syntax:
    """The syntax check of ``agentctl submit`` (:meth:`check`)."""

    audited = False  # this process is the agentctl command: :meth:`stop_before_running` is its audit hook
    armed = False  # within check()

    @classmethod
    def stop_before_running(cls, event: str, args: tuple[Any, ...]) -> None:
        if cls.armed and event == "exec":
            cls.armed = False
            raise _Compiled

    @classmethod
    def check(cls, source: str, path: str) -> None:
        """Raise SyntaxError when ``source`` does not compile (nothing of it runs).

        The agentctl command compiles through ``exec``, which raises the ``exec`` audit
        event with the compiled code object before running it; the hook raises there.
        Builtin ``compile()`` gives the same errors but builds the ``ast`` module's
        hundred-odd classes on its first call, about a fifth of agentctl's whole run.
        Anywhere else (``main()`` called by another program) it is ``compile()``: an
        audit hook cannot be removed once added.
        """
        if not cls.audited:
            compile(source, path, "exec", flags=_TOP_LEVEL_AWAIT)
            return
        cls.armed = True
        try:
            exec(source, {"__builtins__": {}})
        except _Compiled:
            return
        except SyntaxError:  # maybe a top-level await, which agentd takes as agent run does
            cls.armed = False
            compile(source, path, "exec", flags=_TOP_LEVEL_AWAIT)
            return
        finally:
            cls.armed = False
        raise AssertionError("the exec audit event did not stop the workflow from running")


def _text(raw: bytes, path: str) -> str:
    """The file's text: UTF-8, or the encoding its coding line declares (PEP 263)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    import io
    import tokenize

    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise Refused(f"{path} is not text in its encoding ({exc}): save it as UTF-8", EXIT_USAGE) from None


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise Refused(f"cannot read {args.file}: {exc.strerror}", EXIT_USAGE) from None
    source = _text(raw, args.file)
    try:
        _Syntax.check(source, args.file)  # a syntax error is caught here, not in a runner
    except SyntaxError as exc:
        raise Refused(f"{args.file}:{exc.lineno}: {exc.msg}: fix it before submitting", EXIT_USAGE) from None
    reply = client.call("submit", source=source, path=os.path.abspath(args.file), name=args.name,
                        priority=args.priority, params=dict(args.param or []), cwd=os.getcwd())
    if args.json:
        _print_json({"job": reply["job"], "status": reply["status"], "name": reply["name"]})
    else:
        print(reply["job"])
    return EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    jobs = client.call("list")["jobs"]
    if args.json:
        _print_json(jobs)
    elif jobs:
        print(_table(jobs))
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    job = client.call("status", job=args.job)["job"]
    if args.json:
        _print_json(job)
    else:
        print(_describe(job))
    return EXIT_OK


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    offset = 0
    collected: list[str] = []
    while True:
        reply = client.call("logs", job=args.job, state=args.state, offset=offset)
        text = reply["text"]
        offset = reply["offset"]
        if args.json:
            collected.append(text)
        elif text:
            sys.stdout.write(text)
            sys.stdout.flush()
        if reply.get("note") and not args.follow:
            print(f"agentctl: {reply['note']}", file=sys.stderr)
        if not text and (not args.follow or reply["done"]):
            break  # all of it (a reply carries at most 1 MiB: a long log takes several)
        if not text:
            time.sleep(FOLLOW_INTERVAL)
    if args.json:
        _print_json({"job": args.job, "state": args.state, "text": "".join(collected)})
    return EXIT_OK


def cmd_steer(client: Client, args: argparse.Namespace) -> int:
    job = client.call(args.command, job=args.job)["job"]
    if args.json:
        _print_json(job)
    else:
        print(f"job {job['job']} {job['status']}")
    return EXIT_OK


def cmd_respond(client: Client, args: argparse.Namespace) -> int:
    client.call("respond", job=args.job, request=args.request, answer=args.answer)
    if args.json:
        _print_json({"job": args.job, "request": args.request, "answered": True})
    else:
        print(f"answered question {args.request} of job {args.job}")
    return EXIT_OK


def _top_text(data: dict[str, Any]) -> str:
    pool, agentd = data["pool"], data["agentd"]
    totals, allocated = pool["totals"], pool["allocated"]
    counts: dict[str, int] = {}
    for job in data["jobs"]:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    lines = [
        f"agentd {agentd['version']} pid {agentd['pid']} up {_age(agentd['uptime'])}  cgroups {agentd['cgroups']}"
        f"  {time.strftime('%H:%M:%S')}",
        "jobs  " + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "jobs  none",
        f"pool  CPU {allocated['cpu']:g}/{totals['cpu']:g}  memory {allocated['memory']:g}/{totals['memory']:g} MiB"
        f"  GPU {allocated['gpu']:g}/{totals['gpu']:g}  holders {pool['holders']}  waiting {pool['waiting']}"
        f"  preempted {pool['preempted']}",
        "",
    ]
    active = [j for j in data["jobs"] if j["status"] in ("running", "queued", "paused")]
    if active:
        lines.append(_table(active))
        for job in active:
            for state, reason in sorted((job.get("waiting") or {}).items()):
                lines.append(f"  job {job['job']} {state}: waiting for {reason}")
            for q in job.get("pending") or []:
                lines.append(f"  job {job['job']} asks ({q['id']}): {q['prompt']}")
    for user, coordination in sorted((data.get("coordination") or {}).items()):
        for name, p in sorted(coordination.get("primitives", {}).items()):
            if p["owners"] or p["wait_count"]:
                lines.append(f"  {user}: {p['type'].upper()} {name!r} held by {', '.join(p['owners']) or 'nobody'}"
                             f", {p['wait_count']} waiting")
        for name, r in sorted(coordination.get("rate_limiters", {}).items()):
            if r["wait_count"]:
                lines.append(f"  {user}: rate limit {name!r}, {r['wait_count']} waiting")
    return "\n".join(lines)


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    live = not args.json and not args.once and sys.stdout.isatty()
    while True:
        data = client.call("top")
        if args.json:
            data.pop("op", None)
            data.pop("ok", None)
            _print_json(data)
            return EXIT_OK
        text = _top_text(data)
        if not live:
            print(text)
            return EXIT_OK
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        sys.stdout.flush()
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from .._version import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("--socket", default=argparse.SUPPRESS, help="agentd's socket (default: $AGENT_SOCKET, "
                        "else /run/agent/agentd.sock)")
    parser = argparse.ArgumentParser(prog="agentctl", parents=[common],
                                     description="Submit workflows to agentd and watch and steer them.")
    parser.add_argument("--version", action="version", version=f"agentctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", parents=[common], help="run a workflow file as a job; prints its id")
    p.add_argument("file", help="a Python file defining an Agent at module level")
    p.add_argument("--name", help="the job's name (default: the file's)")
    p.add_argument("--priority", help="low, normal, high or critical (at most your ceiling)")
    p.add_argument("--param", action="append", type=_param, metavar="NAME=VALUE",
                   help="initial context entry (VALUE parsed as JSON when it is JSON); repeatable")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("list", parents=[common], help="your jobs (every job for root and admins)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("status", parents=[common], help="a job: status, states, open questions")
    p.add_argument("job")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("logs", parents=[common], help="a job's output, or one state's")
    p.add_argument("job")
    p.add_argument("state", nargs="?", default=None)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job stops")
    p.set_defaults(func=cmd_logs)
    for op, what in (("cancel", "cancel a job (its running states stop)"),
                     ("pause", "checkpoint and stop a job; resume continues it"),
                     ("resume", "continue a paused job, or re-run a failed job's failed states")):
        p = sub.add_parser(op, parents=[common], help=what)
        p.add_argument("job")
        p.set_defaults(func=cmd_steer)
    p = sub.add_parser("respond", parents=[common], help="answer a job's question (human in the loop)")
    p.add_argument("job")
    p.add_argument("request", help="the question's id (agentctl status JOB lists them)")
    p.add_argument("answer")
    p.set_defaults(func=cmd_respond)
    p = sub.add_parser("top", parents=[common], help="live view of the box: pool, jobs, waits, questions")
    p.add_argument("--once", action="store_true", help="print one view and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.set_defaults(func=cmd_top)
    p = sub.add_parser("install", help="install agentd as a systemd service and start it (root)")
    p.add_argument("--root", default="/", help="write the files below this directory and run nothing")
    p.add_argument("--no-start", action="store_true", help="install, but do not enable and start it")
    p.set_defaults(func=None)
    return parser


def cmd_install(args: argparse.Namespace) -> int:
    from .install import install

    for line in install(args.root, start=not args.no_start):
        print(line)
    return EXIT_OK


_QUICK_OPTIONS = {"--name": "name", "--priority": "priority", "--param": "param", "--socket": "socket"}


def _quick_submit(argv: list[str]) -> Any:
    """The arguments of ``submit FILE [--name N] [--priority P] [--param K=V]... [--json] [--socket S]``
    (each option also as ``--opt=VALUE``), as the full parser would give them; None for any
    other command line, which the full parser then reads (and explains, when it is wrong).
    """
    if not argv or argv[0] != "submit":
        return None
    values: dict[str, Any] = {"command": "submit", "func": cmd_submit, "file": None, "name": None,
                              "priority": None, "param": None, "json": False}
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--json":
            values["json"] = True
            continue
        if not arg.startswith("-"):
            if values["file"] is not None:
                return None
            values["file"] = arg
            continue
        option, sep, value = arg.partition("=")
        if option not in _QUICK_OPTIONS:
            return None
        if not sep:
            following = next(rest, None)
            if following is None or following.startswith("-"):
                return None
            value = following
        if option == "--param":
            if "=" not in value or value.startswith("="):
                return None
            values["param"] = [*(values["param"] or []), _param(value)]
        else:
            values[_QUICK_OPTIONS[option]] = value
    if values["file"] is None:
        return None
    import types

    return types.SimpleNamespace(**values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _quick_submit(argv) or build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        if args.command == "install":
            return cmd_install(args)
        client = Client(protocol.socket_path(getattr(args, "socket", None)))
        return int(args.func(client, args))
    except Refused as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_REFUSED
    except BrokenPipeError:  # stdout went away mid-output (`agentctl logs 7 -f | head`), as console() says
        return EXIT_REFUSED
    except Exception as exc:
        from ..errors import DaemonError, DaemonUnavailableError

        if not isinstance(exc, DaemonError):
            raise
        print(f"agentctl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(exc, DaemonUnavailableError) else EXIT_REFUSED


def console() -> NoReturn:
    """The ``agentctl`` command: :func:`main`, then exit without the interpreter's teardown.

    agentctl holds nothing that needs it (no atexit work, no files but stdout and stderr,
    flushed here, a socket the kernel closes), and tearing the interpreter down was
    about an eighth of a submit's work.
    """
    sys.addaudithook(_Syntax.stop_before_running)
    _Syntax.audited = True
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # stdout went away (`agentctl list | head`): what the teardown does too
        code = code or EXIT_REFUSED
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
