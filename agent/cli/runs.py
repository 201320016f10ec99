"""``agent runs``: the runs saved in checkpoint stores, to resume one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..values import printable
from .exit_codes import ExitCode
from .text import ago, timestamp


class _NotLoaded(ValueError):
    """FILE cannot be loaded, or defines no agent (exit 3, as ``agent run FILE``)."""


def runs_command(args: argparse.Namespace) -> int:
    try:
        stores = _stores(args)
    except _NotLoaded as exc:
        print(f"agent runs: {exc}", file=sys.stderr)
        return ExitCode.LOAD_FAILED
    except (LookupError, ValueError) as exc:
        print(f"agent runs: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    from ..live.client import live_run_ids

    live_ids = live_run_ids()
    listing: list[tuple[Path, list[dict[str, Any]]]] = []
    unreadable = []
    for path in stores:
        try:
            listing.append((path, _runs_in(path, args.agent, args.limit, live_ids)))
        except Exception as exc:  # one unreadable store must not hide the others
            print(f"agent runs: cannot read {path}: {exc}", file=sys.stderr)
            unreadable.append(path)
    # The store asked for (--store) cannot be read: a usage error, as for agent run --store.
    failed = ExitCode.USAGE if args.store and unreadable else ExitCode.OK
    if args.json:
        print(json.dumps([run for _, runs in listing for run in runs], indent=2))
        return failed
    shown = [(path, runs) for path, runs in listing if runs]
    if not shown:
        if not unreadable:
            where = ", ".join(str(p) for p in stores) or "no store exists yet"
            print(f"agent runs: no saved runs{f' of agent {args.agent!r}' if args.agent else ''} ({where})")
        return failed
    for number, (path, runs) in enumerate(shown):
        if number:
            print()
        print(path)
        rows = [("RUN ID", "AGENT", "STATUS", "STARTED", "LAST SAVED", "CHECKPOINTS")]
        rows += [(r["run_id"], printable(r["agent_name"]), r["state"], timestamp(r["created"]), ago(r["updated"]),
                  str(r["checkpoints"])) for r in runs]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return failed


def _stores(args: argparse.Namespace) -> list[Path]:
    from ..store_index import known_stores

    if args.store:
        path = Path(args.store)
        if not path.is_file():
            raise LookupError(f"no checkpoint store at {path}")
        return [path.resolve()]
    if args.file:
        return _stores_of_file(args.file)
    return known_stores()


def _stores_of_file(file: str) -> list[Path]:
    """The stores the agents of ``file`` save to, found the way ``agent run`` would."""
    from ..checkpoint_store import default_store_path
    from . import workflow

    path = workflow.check_file(file)
    try:
        runs_itself = workflow.starts_a_run(workflow.parse(path))
    except workflow.WorkflowLoadError as exc:
        raise _NotLoaded(f"cannot load {file}:\n{exc}") from None
    if runs_itself:
        raise ValueError(f"{file} runs its agent when loaded: name its store with --store instead")
    try:
        loaded = workflow.load(path, [])
    except SystemExit as exc:  # an argument check of its own, say: as `agent run` says it
        raise _NotLoaded(workflow.exited_while_loading(file, exc)) from None
    except Exception as exc:
        detail = str(exc) if isinstance(exc, workflow.WorkflowLoadError) else workflow.user_traceback(
            exc, str(path.resolve()))
        raise _NotLoaded(f"cannot load {file}:\n{detail}") from None
    agents = loaded.find_agents()
    if not agents:
        raise _NotLoaded(f"{file} defines no Agent at module level: it has no runs to list")
    found: list[Path] = []
    for agent in agents.values():
        store_path = getattr(agent.checkpoint_store, "path", None)
        candidate = Path(store_path) if store_path else default_store_path()
        if candidate.is_file() and candidate.resolve() not in found:
            found.append(candidate.resolve())
    return found


def _runs_in(path: Path, agent: str | None, limit: int, live_ids: dict[str, int | None]) -> list[dict[str, Any]]:
    from ..checkpoint_store import SQLiteCheckpointStore

    with SQLiteCheckpointStore(path, keep=None) as store:
        infos = store.list_runs(agent_name=agent)[:limit]
    out = []
    for info in infos:
        state = info.status
        if state == "running" and info.run_id not in live_ids:
            state = "interrupted"  # saved as running, and no live process has it: it died
        out.append({
            "run_id": info.run_id, "agent_name": info.agent_name, "status": info.status, "state": state,
            "created": info.created, "updated": info.updated, "checkpoints": info.checkpoints,
            "store": str(path),
        })
    return out


