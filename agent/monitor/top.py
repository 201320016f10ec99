"""``agent top``: the runs of every process of this user on this machine, live, and the saved ones.

Each process that runs agents answers on a private status socket (:mod:`agent.live`);
``agent top`` asks them all every ``--interval`` and draws one screen: runs, the states
running now, questions waiting for an answer, failures, and the latest runs saved in
checkpoint stores. ``--once`` prints one frame, ``--json`` the data. ``--demo`` runs
demo workflows in this process under :class:`TopView`, a richer view of one process
drawn from a :class:`MetricsCollector` (throughput and CPU history; needs ``rich``).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
import unicodedata
from collections.abc import Sequence
from typing import Any

try:
    from rich import box
    from rich.console import Console, Group, RenderableType
    from rich.live import Live
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text
except ImportError as exc:  # an optional dependency: say how to get it instead of a traceback
    _NO_RICH: ImportError | None = exc
    RenderableType = Any  # type: ignore[misc]
else:
    _NO_RICH = None

from .. import values
from ..cli.text import duration
from ..errors import MonitorError
from .collector import LiveSnapshot, MetricsCollector, RunView

_INSTALL_HINT = "agent top needs the rich package: pip install 'agent-isolation[monitor]'"

EXIT_OK = 0
EXIT_USAGE = 2

_BARS = "▁▂▃▄▅▆▇█"
_STATUS_STYLE = {"running": "bold cyan", "completed": "green", "failed": "bold red", "cancelled": "yellow"}
MAX_STATE_ROWS = 12
MAX_RECENT_ROWS = 6


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """Unicode bars for the last ``width`` values, scaled to their maximum."""
    values = list(values)[-width:]
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return _BARS[0] * len(values)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in values)


def _short(run_id: str) -> str:
    return run_id[:8]


def _printable(text: object) -> str:
    """A name, prompt or error from other processes' code, for the terminal (a newline in one
    would add a fake row, an escape sequence would reach the terminal)."""
    return values.printable(str(text))


def _cell_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide (east asian) characters take two, combining ones none."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _clip(text: str, width: int) -> str:
    """The longest start of ``text`` that fits in ``width`` terminal columns."""
    if _cell_width(text) <= width:
        return text
    used = 0
    for i, ch in enumerate(text):
        used += _cell_width(ch)
        if used > width:
            return text[:i]
    return text


def _user_text(text: object, style: str = "") -> Text:
    """A cell drawn from user data: escaped, and never read as rich markup (``[red]`` stays text)."""
    return Text(_printable(text), style=style)


class TopView:
    """What ``agent top`` draws; call :meth:`update` on each real-time tick."""

    def __init__(self, source: MetricsCollector, title: str = "agent top", history: int = 48) -> None:
        if _NO_RICH is not None:
            raise MonitorError(f"{_INSTALL_HINT} ({_NO_RICH})")
        self._source = source
        self._title = title
        self._history = history
        self._sps: tuple[float, ...] = ()
        self._cpu: tuple[float, ...] = ()
        self._snapshot: LiveSnapshot = source.live()
        self._wall = time.time()

    def update(self) -> LiveSnapshot:
        """Read the collector now and extend the throughput and CPU history."""
        snap = self._source.live()
        self._snapshot = snap
        self._wall = time.time()
        self._sps = (self._sps + (snap.states_per_second,))[-self._history:]
        self._cpu = (self._cpu + (snap.used_cpu_percent,))[-self._history:]
        return snap

    @property
    def snapshot(self) -> LiveSnapshot:
        return self._snapshot

    # --- rendering ---------------------------------------------------------------------

    def _header(self, snap: LiveSnapshot) -> RenderableType:
        running = sum(len(run.running) for run in snap.active)
        grid = Table.grid(expand=True, padding=(0, 2))
        for ratio in (3, 2, 3, 2):
            grid.add_column(ratio=ratio, no_wrap=True)
        grid.add_row(
            Text.assemble(("runs ", "dim"), (f"{len(snap.active)}", "bold cyan"), (" active", "dim")),
            Text.assemble(("states ", "dim"), (f"{running}", "bold cyan"), (" running", "dim")),
            Text.assemble(("completed ", "dim"), (f"{snap.states_completed:,}", "bold green")),
            Text.assemble(("failed attempts ", "dim"),
                          (f"{snap.attempts_failed:,}", "bold red" if snap.attempts_failed else "green")),
        )
        grid.add_row(
            Text.assemble(("throughput ", "dim"), (f"{snap.states_per_second:,.1f}", "bold"), (" states/s", "dim")),
            Text(sparkline(self._sps), style="cyan"),
            Text.assemble(("CPU ", "dim"), (f"{snap.used_cpu_percent:.0f}%", "bold"),
                          ("  mem ", "dim"), (f"{snap.process_memory_mb:,.0f} MiB", "bold")),
            Text(sparkline(self._cpu), style="magenta"),
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(self._wall))
        return Panel(grid, title=f"[bold]{self._title}[/]", subtitle=stamp, box=box.ROUNDED, border_style="blue")

    @staticmethod
    def _runs_table(runs: Sequence[RunView]) -> Table:
        table = Table(title="runs", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, expand=True,
                      title_style="bold")
        table.add_column("AGENT", style="bold")
        table.add_column("RUN", style="dim")
        table.add_column("STATUS")
        table.add_column("ELAPSED", justify="right")
        table.add_column("DONE", justify="right")
        table.add_column("FAILED", justify="right")
        table.add_column("RETRIES", justify="right")
        table.add_column("WAITING", justify="right")
        table.add_column("RUNNING NOW", ratio=1, overflow="ellipsis", no_wrap=True)
        for run in runs:
            table.add_row(
                _user_text(run.agent_name),
                _user_text(_short(run.run_id)),
                _user_text(run.status, _STATUS_STYLE.get(run.status, "")),
                duration(run.elapsed),
                str(run.completed),
                Text(str(run.failed_attempts), style="red" if run.failed_attempts else "dim"),
                str(run.retries),
                str(run.queued),
                _user_text(", ".join(state.state for state in run.running) or "-"),
            )
        if not runs:
            table.add_row(Text("no runs in progress", style="dim"), *[""] * 8)
        return table

    @staticmethod
    def _states_table(runs: Sequence[RunView]) -> Table:
        states = sorted((s for run in runs for s in run.running), key=lambda s: -s.running_for)
        table = Table(title="running states", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, expand=True,
                      title_style="bold")
        table.add_column("AGENT", style="bold")
        table.add_column("STATE", style="cyan")
        table.add_column("ATTEMPT", justify="right")
        table.add_column("RUNNING FOR", justify="right")
        table.add_column("", ratio=1)
        longest = max((s.running_for for s in states), default=0.0)
        for state in states[:MAX_STATE_ROWS]:
            share = state.running_for / longest if longest > 0 else 0.0
            bar = "━" * max(1, math.ceil(share * 20))
            table.add_row(
                _user_text(state.agent_name),
                _user_text(state.state),
                Text(str(state.attempt), style="yellow" if state.attempt > 1 else ""),
                duration(state.running_for),
                Text(bar, style="green" if state.attempt == 1 else "yellow"),
            )
        if len(states) > MAX_STATE_ROWS:
            table.add_row(Text(f"... {len(states) - MAX_STATE_ROWS} more", style="dim"), "", "", "", "")
        return table

    @staticmethod
    def _recent_table(runs: Sequence[RunView]) -> Table:
        table = Table(title="finished", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, expand=True,
                      title_style="bold")
        table.add_column("AGENT", style="bold")
        table.add_column("RUN", style="dim")
        table.add_column("STATUS")
        table.add_column("DURATION", justify="right")
        table.add_column("DONE", justify="right")
        table.add_column("FAILED", justify="right")
        for run in runs[:MAX_RECENT_ROWS]:
            table.add_row(
                _user_text(run.agent_name),
                _user_text(_short(run.run_id)),
                _user_text(run.status, _STATUS_STYLE.get(run.status, "")),
                duration(run.elapsed),
                str(run.completed),
                Text(str(run.failed_attempts), style="red" if run.failed_attempts else "dim"),
            )
        return table

    def __rich__(self) -> RenderableType:
        snap = self._snapshot
        parts: list[RenderableType] = [self._header(snap), self._runs_table(snap.active)]
        if any(run.running for run in snap.active):
            parts += [Text(""), self._states_table(snap.active)]
        if snap.recent:
            parts += [Text(""), self._recent_table(snap.recent)]
        return Group(*parts)


def render_text(view: TopView, width: int = 110) -> str:
    """One frame of the view as plain text (for logs, READMEs and tests)."""
    console = Console(record=True, width=width, file=_Null(), color_system=None, force_terminal=False)
    console.print(view)
    return console.export_text()


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


# --- the demo ----------------------------------------------------------------------------


def demo_agents(speed: float = 1.0, isolation: str = "inline") -> list[Any]:
    """Three workflows that keep the view busy: an ETL fan-out, a training loop, a batch fan-out."""
    import random

    from ..agent import Agent

    rng = random.Random(7)

    def pause(seconds: float) -> float:
        return seconds / speed

    async def work(seconds: float) -> None:
        # Some real CPU on the loop (inline states share it), then waiting, like I/O.
        busy_until = time.process_time() + pause(seconds) / 40
        while time.process_time() < busy_until:
            sum(i * i for i in range(500))
        await asyncio.sleep(pause(seconds) * 0.9)

    etl = Agent("etl_pipeline", isolation=isolation)
    shards = [f"transform_{i}" for i in range(6)]

    async def extract(context):
        await work(0.6)
        return shards

    def transform(i: int):
        async def transform_shard(context):
            await work(0.8 + 0.3 * rng.random() + 0.1 * i)
            return "load"
        return transform_shard

    async def load(context):
        await work(0.7)
        return "report"

    async def report(context):
        await work(0.3)
        return None

    etl.add_state("extract", extract)
    for i, name in enumerate(shards):
        etl.add_state(name, transform(i))
    etl.add_state("load", load)
    etl.add_state("report", report)

    training = Agent("model_training", isolation=isolation)

    async def fetch_weights(context):
        await work(0.3)
        if context.attempt <= 2:  # its attempt number, not a count of ours: a state's process has its own
            raise ConnectionError("weights server busy")
        return "train_epoch"

    async def train_epoch(context):
        epoch = context.get_state("epoch", 0) + 1
        context.set_state("epoch", epoch)
        await work(0.5)
        return "train_epoch" if epoch < 6 else "evaluate"

    async def evaluate(context):
        await work(0.6)
        return None

    training.add_state("fetch_weights", fetch_weights, max_retries=3)
    training.add_state("train_epoch", train_epoch)
    training.add_state("evaluate", evaluate)

    batch = Agent("batch_inference", isolation=isolation)
    parts = [f"infer_{i:02d}" for i in range(10)]

    async def split(context):
        await work(0.4)
        return parts

    def infer(i: int):
        async def infer_part(context):
            await work(0.4 + 0.25 * (i % 4))
            return "merge"
        return infer_part

    async def merge(context):
        await work(0.4)
        return None

    batch.add_state("split", split)
    for i, name in enumerate(parts):
        batch.add_state(name, infer(i))
    batch.add_state("merge", merge)
    return [etl, training, batch]


async def run_demo(
    interval: float = 0.25,
    speed: float = 1.0,
    console: Console | None = None,
    snapshot: bool = False,
    isolation: str = "inline",
) -> TopView:
    """Run the demo workflows under a live view; returns the view (with the busiest frame when ``snapshot``)."""
    from .realtime import RealTimeMetrics

    rt = RealTimeMetrics(update_interval=interval)
    view = TopView(rt.collector, title="agent top · demo")
    busiest: dict[str, Any] = {"running": -1, "text": ""}
    console = console or Console()
    live = None if snapshot else Live(view, console=console, auto_refresh=False, transient=False)

    def on_update(metrics: dict) -> None:
        snap = view.update()
        if live is not None:
            live.refresh()
        # the busiest frame that also shows finished runs
        running = sum(len(run.running) for run in snap.active) + (100 if snap.recent else 0)
        if snapshot and running > busiest["running"]:
            busiest["running"] = running
            busiest["text"] = render_text(view, width=console.width)

    rt.subscribe(on_update)
    etl, training, batch = demo_agents(speed=speed, isolation=isolation)

    async def batches() -> None:  # a job that comes back, so finished runs show up
        for _ in range(3):
            await batch.run()

    if live is not None:
        live.start()
    await rt.start()
    try:
        await asyncio.gather(etl.run(), training.run(), batches())
    finally:
        await rt.stop()
        if live is not None:
            live.stop()
    if snapshot:
        console.print(busiest["text"] or render_text(view, width=console.width), end="", markup=False,
                      highlight=False)
    return view


# --- the box-wide view ----------------------------------------------------------------------


def collect(*, include_self: bool = False, saved: int = 8) -> dict[str, Any]:
    """Every live run of this user (from the status endpoints) and the latest saved ones."""
    from ..live.client import live_runs

    endpoints = live_runs(include_self=include_self)
    live_ids = {run["run_id"] for e in endpoints for run in e.runs}
    shown = [r for r in _saved_runs(saved + len(live_ids)) if r["run_id"] not in live_ids][:saved]
    for run in shown:  # as `agent runs` says it: saved as running, and no live process has it
        run["state"] = "interrupted" if run["status"] == "running" else run["status"]
    return {
        "time": time.time(),
        "processes": [{"pid": e.pid, "command": e.command, "runs": e.runs, "error": e.error} for e in endpoints],
        "saved": shown,
    }


def _saved_runs(limit: int) -> list[dict[str, Any]]:
    from ..checkpoint_store import SQLiteCheckpointStore
    from ..store_index import known_stores

    found = []
    for path in known_stores():
        try:
            with SQLiteCheckpointStore(path, keep=None) as store:
                infos = store.list_runs()[:limit]
        except Exception:  # an unreadable store hides only its own runs
            continue
        found += [{"run_id": i.run_id, "agent": i.agent_name, "status": i.status, "updated": i.updated,
                   "store": str(path)} for i in infos]
    found.sort(key=lambda r: -r["updated"])
    return found[:limit]


_COLORS = {"running": "36", "completed": "32", "failed": "31", "cancelled": "33", "paused": "33",
           "interrupted": "31"}


def render_box(view: dict[str, Any], width: int = 100, color: bool = False) -> str:
    """One frame of the box-wide view as text (what ``agent top`` prints)."""
    from ..cli.text import ago

    def paint(text: str, status: str) -> str:
        code = _COLORS.get(status)
        return f"\033[{code}m{text}\033[0m" if color and code else text

    runs = [(p, r) for p in view["processes"] for r in p["runs"]]
    active = [(p, r) for p, r in runs if r["status"] in ("running", "paused")]
    stamp = time.strftime("%H:%M:%S", time.localtime(view["time"]))
    lines = [f"agent top · {len(view['processes'])} process(es) · {len(active)} live run(s) · {stamp}", ""]
    table = [("PID", "AGENT", "RUN", "STATUS", "ELAPSED", "DONE", "RUNNING", "WAITING", "FAILED", "NOW")]
    statuses = [""]
    for process, run in sorted(runs, key=lambda pr: (pr[1]["status"] not in ("running", "paused"), -pr[1]["started"])):
        counts = run["states"]
        now = ", ".join(s["state"] for s in run.get("running", ())) or "-"
        table.append((str(process["pid"]), run["agent"], run["run_id"][:8], run["status"], duration(run["elapsed"]),
                      f"{counts['completed']}/{counts['total']}", str(counts["running"]), str(counts["waiting"]),
                      str(counts["failed"]), now))
        statuses.append(run["status"])
    if len(table) == 1:
        lines.append("no runs in any process of this user right now")
    else:
        lines += _columns(table, statuses, width, paint)
    states = [(process, run, s) for process, run in active for s in run.get("running", ())]
    if states:
        lines += ["", "running states"]
        rows = [("PID", "AGENT", "STATE", "ATTEMPT", "RUNNING FOR", "ISOLATION")]
        for process, run, state in sorted(states, key=lambda t: -t[2]["for"])[:MAX_STATE_ROWS]:
            rows.append((str(process["pid"]), run["agent"], state["state"], str(state["attempt"]),
                         duration(state["for"]), state["isolation"]))
        lines += _columns(rows, ["" for _ in rows], width, paint)
    questions = [(run, q) for _, run in active for q in run.get("human_input", ())]
    if questions:
        lines += ["", "waiting for an answer"]
        for run, q in questions:
            default = f", default {q['default']!r}" if q.get("default") is not None else ""
            lines.append(_clip(_printable(f"  {run['agent']}/{q['state']}: {q['prompt']}{default}"), width))
    failing = [(run, f) for _, run in runs for f in run.get("failed", ())]
    if failing:
        lines += ["", "failed or blocked states"]
        for run, f in failing[:MAX_RECENT_ROWS]:
            error = f["error"].splitlines()[0] if f["error"] else ""
            lines.append(paint(_clip(_printable(f"  {run['agent']}/{f['state']} {f['status']}: {error}"), width),
                               "failed"))
    unreachable = [p for p in view["processes"] if p["error"]]
    if view["saved"]:
        lines += ["", "saved runs (checkpoint stores)"]
        rows = [("AGENT", "RUN", "STATUS", "LAST SAVED", "STORE")]
        shown = [""]
        for run in view["saved"]:
            status = run.get("state", run["status"])
            rows.append((run["agent"], run["run_id"], status, ago(run["updated"], view["time"]), run["store"]))
            shown.append(status)
        lines += _columns(rows, shown, width, paint)
    for process in unreachable:
        lines.append(_clip(_printable(f"(pid {process['pid']}: {process['error']})"), width))
    return "\n".join(lines) + "\n"


def _columns(rows: list[tuple[str, ...]], statuses: list[str], width: int, paint: Any) -> list[str]:
    """Aligned rows of cells, each escaped (:func:`_printable`) and padded to its column's width
    in terminal columns; each line clipped to ``width``."""
    escaped = [[_printable(cell) for cell in row] for row in rows]
    widths = [max(_cell_width(row[i]) for row in escaped) for i in range(len(rows[0]))]
    out = []
    for row, status in zip(escaped, statuses):
        cells = [cell + " " * (w - _cell_width(cell)) for cell, w in zip(row, widths)]
        line = _clip(("  " + "  ".join(cells)).rstrip(), width)
        out.append(paint(line, status) if status else line)
    return out


def top_command(args: Any) -> int:
    """``agent top``: see :func:`agent.cli.build_parser` for the options."""
    import json
    import shutil

    if args.demo and args.json:
        print("agent top: --json prints what other processes run, --demo draws demo workflows of its own: "
              "give one of them", file=sys.stderr)
        return EXIT_USAGE
    if args.demo:
        return _demo(args)
    if args.json:
        print(json.dumps(collect(), indent=2, default=str))
        return EXIT_OK
    width = args.width or shutil.get_terminal_size((110, 24)).columns
    tty = sys.stdout.isatty()
    color = tty and not os.environ.get("NO_COLOR")  # https://no-color.org, as agent run's prefixes
    if args.once or not tty:
        sys.stdout.write(render_box(collect(), width, color=color))
        return EXIT_OK
    try:
        while True:
            frame = render_box(collect(), width, color=color)
            sys.stdout.write("\033[H\033[2J" + frame)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _demo(args: Any) -> int:
    if _NO_RICH is not None:
        print(f"{_INSTALL_HINT} ({_NO_RICH})", file=sys.stderr)
        return EXIT_USAGE
    console = Console(width=args.width) if args.width else Console()
    try:
        asyncio.run(run_demo(min(args.interval, 0.25), args.speed, console, args.once, args.isolation))
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.monitor.top ...``: the same as ``agent top ...``."""
    from ..cli import main as agent_main

    return agent_main(["top", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
