"""The ``agent`` command: run a workflow file, inspect this machine, watch runs.

Exit codes are named below; heavy modules are imported only by the command that needs
them, so ``agent --version`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_AGENT = 3
EXIT_CANCELLED = 4


def _load_agent(path: str, name: str | None) -> Any:
    import runpy

    from .agent import Agent

    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"agent run: no such file: {path}")
    sys.path.insert(0, str(file.resolve().parent))
    namespace = runpy.run_path(str(file), run_name="__agent_workflow__")
    agents = {k: v for k, v in namespace.items() if isinstance(v, Agent)}
    if name is not None:
        for value in agents.values():
            if value.name == name:
                return value
        if name in agents:
            return agents[name]
        raise LookupError(f"{path} defines no agent named {name!r} (it has: {', '.join(a.name for a in agents.values()) or 'none'})")
    if not agents:
        raise LookupError(f"{path} defines no Agent at module level: assign one, e.g. `agent = Agent(\"my_flow\")`")
    if len(agents) > 1 and "agent" not in agents:
        raise LookupError(
            f"{path} defines several agents ({', '.join(a.name for a in agents.values())}): pick one with --agent NAME"
        )
    return agents.get("agent") or next(iter(agents.values()))


def _summary(agent: Any) -> dict[str, Any]:
    return {
        "agent": agent.name,
        "run_id": agent.run_id,
        "status": agent.status.value,
        "states": {n: m.status.value for n, m in agent.state_metadata.items()},
        "context_keys": sorted(agent.context.keys()),
    }


def _print_state_output(agent: Any) -> None:
    """Echo what isolated states printed (kept per attempt in their log files), in start order."""
    from .errors import AgentError

    attempts = sorted(
        (rec.started_at, name, rec.number)
        for name, meta in agent.state_metadata.items()
        if (meta.isolation or agent.isolation).value != "inline"
        for rec in meta.history
    )
    for _, name, number in attempts:
        try:
            text = agent.logs(name, number)
        except (AgentError, OSError):
            continue
        for line in text.splitlines():
            print(f"[{name}#{number}] {line}")


def _cmd_run(args: argparse.Namespace) -> int:
    from .errors import AgentError

    try:
        agent = _load_agent(args.file, args.agent)
    except LookupError as exc:
        print(f"agent run: {exc}", file=sys.stderr)
        return EXIT_NO_AGENT
    if args.isolation:
        from .executor import Isolation

        agent.isolation = Isolation.parse(args.isolation)
    code = EXIT_OK
    try:
        if args.resume:
            from .checkpoint_store import open_default_store

            store = agent.checkpoint_store or open_default_store()
            if store.latest(args.resume) is None:
                print(f"agent run: no checkpoint for run {args.resume!r} in {store!r}", file=sys.stderr)
                return EXIT_USAGE
            import uvloop

            uvloop.run(agent.resume_run(args.resume, store))
        else:
            from .events import RUN_STARTED

            def announce(event: Any) -> None:  # the id to resume with, should this process die
                if event.kind == RUN_STARTED:
                    print(f"agent run: run_id {event.run_id}", file=sys.stderr, flush=True)

            agent.add_observer(announce)
            agent.run_sync(timeout=args.timeout)
    except AgentError as exc:
        print(f"agent run: {exc}", file=sys.stderr)
        code = EXIT_RUN_FAILED
    except KeyboardInterrupt:
        code = EXIT_CANCELLED
    _print_state_output(agent)
    print(json.dumps(_summary(agent), indent=2, default=str))
    return code


def _cmd_runs(args: argparse.Namespace) -> int:
    from .checkpoint_store import SQLiteCheckpointStore, default_store_path
    from .errors import CheckpointError

    path = Path(args.store) if args.store else default_store_path()
    if not path.exists():
        print(f"agent runs: no checkpoint store at {path}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with SQLiteCheckpointStore(path, keep=None) as store:
            runs = store.list_runs(agent_name=args.agent)
    except CheckpointError as exc:
        print(f"agent runs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import dataclasses

    print(json.dumps([dataclasses.asdict(r) for r in runs], indent=2))
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .supervisor.doctor import main as doctor_main

    return doctor_main(args.rest)


def _cmd_top(args: argparse.Namespace) -> int:
    from .monitor.top import main as top_main

    return top_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="agent", description="Run and inspect agent workflows.")
    parser.add_argument("--version", action="version", version=f"agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the Agent that a workflow file defines")
    run.add_argument("file", help="a Python file defining an Agent at module level")
    run.add_argument("--agent", help="which agent, when the file defines several (its name)")
    run.add_argument("--timeout", type=float, default=None, help="fail the run after this many seconds")
    run.add_argument("--isolation", choices=["inline", "process", "sandbox"], help="override the agent's isolation")
    run.add_argument("--resume", metavar="RUN_ID", help="resume this run from its last checkpoint")
    run.set_defaults(func=_cmd_run)

    runs = sub.add_parser("runs", help="list the runs a checkpoint store holds (to resume one)")
    runs.add_argument("--store", help="the SQLite file (default: $AGENT_STATE_DIR/checkpoints.sqlite3)")
    runs.add_argument("--agent", help="only runs of this agent name")
    runs.set_defaults(func=_cmd_runs)

    doctor = sub.add_parser("doctor", help="what this machine can enforce (cgroups, GPUs, sandbox)")
    doctor.add_argument("rest", nargs=argparse.REMAINDER)
    doctor.set_defaults(func=_cmd_doctor)

    top = sub.add_parser("top", help="live view of running workflows")
    top.add_argument("rest", nargs=argparse.REMAINDER)
    top.set_defaults(func=_cmd_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse.REMAINDER does not take options that come first ("doctor --json"):
    # hand whatever the parser did not know to the subcommands that parse their own.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = unknown + list(args.rest)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
