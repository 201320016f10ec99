"""``agent run FILE``: load a workflow file, run its agent (or watch the run it starts), report.

A file that only defines its ``Agent`` is run by the command, with its options
(``--timeout``, ``--resume``, a checkpoint store). A file that runs its agent itself
(top-level ``await agent.run()``, module-level ``agent.run_sync()``) is watched: the
same progress, notices and summary, and Ctrl-C still pauses it.

Every run the command starts is saved to a checkpoint store (the agent's own, else
``--store``, else the default), so ``agent runs`` lists it and ``--resume`` continues
it after a crash or a Ctrl-C; ``--no-store`` opts out. A context value a checkpoint
cannot hold makes that run unresumable (said once), never failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .. import live
from ..checkpoint import AgentCheckpoint
from ..errors import AgentError, CheckpointError, WorkflowDefinitionError
from ..events import observing
from ..supervisor import output
from ..values import printable
from . import workflow
from .exit_codes import ExitCode
from .progress import Notices, Progress, Terminal, route_std_streams
from .text import counts, duration


class BestEffortStore:
    """The command's store for a run: a checkpoint that cannot be written is reported, not fatal."""

    def __init__(self, store: Any, terminal: Terminal) -> None:
        self.inner = store
        self._terminal = terminal
        self._broken = False
        self._stopped = False

    def stop_saving(self) -> None:
        """Keep the last checkpoint saved as the run's last (see :meth:`RunCommand.keep_paused`)."""
        self._stopped = True

    def save(self, run_id: str, checkpoint: Any, **kwargs: Any) -> int:
        if self._broken or self._stopped:
            return 0
        try:
            return self.inner.save(run_id, checkpoint, **kwargs)
        except CheckpointError as exc:
            self._broken = True
            self._terminal.notice(f"agent run: run {run_id} is no longer saved, so it cannot be resumed: {exc}")
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return repr(self.inner)


class RunCommand:
    """One ``agent run`` invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.since = time.time()
        self.terminal = Terminal(sys.stdout, sys.stderr, bar=not (args.quiet or args.no_progress))
        self.interrupts = 0
        self.stopped_by = ExitCode.INTERRUPTED  # or TERMINATED, once a SIGTERM came
        self.main_task: asyncio.Task[Any] | None = None
        self.cli_agent: Any = None
        self.file: Path | None = None
        self.wf: workflow.Workflow | None = None
        self.progress: Progress | None = None
        self.to_run_again: dict[str, set[str]] = {}  # by run id: what a pause left to run on resume
        self.paused_statuses: dict[str, dict[str, str]] = {}  # by run id: each state's status at the pause

    # --- the command ----------------------------------------------------------------------

    def __call__(self) -> int:
        args = self.args
        try:
            self.file = workflow.check_file(args.file)
            if args.store is not None and not args.no_store:
                check_store_directory(args.store)
            if args.resume and workflow.starts_a_run(workflow.parse(self.file)):
                raise ValueError(
                    f"{args.file} runs its agent itself when loaded, so --resume would start a new run: "
                    "keep the run under `if __name__ == \"__main__\":` (agent run does not execute that block)"
                )
        except workflow.WorkflowLoadError as exc:
            self.terminal.notice(f"agent run: cannot load {args.file}:\n{exc}")
            return ExitCode.LOAD_FAILED
        except (ValueError, OSError) as exc:
            return self.usage(str(exc))
        if args.quiet:
            output.set_writer(None)
        saved = route_std_streams(self.terminal, stdout_to_stderr=args.json)
        progress = self.progress = None if args.quiet else Progress(self.terminal, self.since,
                                                                    lines=not args.no_progress)
        loop = _uvloop()
        asyncio.set_event_loop(loop)
        try:
            if progress is not None:
                progress.start()
            with observing(Notices(self.terminal, announce=not args.quiet)):
                code = self.load_and_run(loop)
            if code == ExitCode.OK and self.terminal.reader_gone:  # it ended before it could pause
                code = ExitCode.READER_GONE
        finally:
            if progress is not None:
                progress.stop()
            self.terminal.close()
            sys.stdout, sys.stderr = saved
            _close(loop)
        return int(code)

    def load_and_run(self, loop: asyncio.AbstractEventLoop) -> int:
        assert self.file is not None
        # A module-level run_sync() runs while the file loads, before drive() takes the
        # signals: Ctrl-C stops it (even where the command was started with SIGINT ignored,
        # as a shell's background job is: drive() takes SIGINT whatever it was), and SIGTERM
        # does as Ctrl-C, exit 143.
        previous = signal.signal(signal.SIGTERM, self.terminate_while_loading)
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.wf = workflow.load(self.file, list(self.args.args))
        except workflow.WorkflowLoadError as exc:
            self.terminal.notice(f"agent run: cannot load {self.args.file}:\n{exc}")
            return ExitCode.LOAD_FAILED
        except KeyboardInterrupt:
            return self.report(interrupted=True)
        except SystemExit as exc:
            return self.exited(exc)
        except Exception as exc:
            return self.failed_while_loading(exc)
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        return loop.run_until_complete(self.drive())

    def terminate_while_loading(self, signum: int, frame: Any) -> None:
        """As Ctrl-C: the SIGINT handler of the run_sync() under way (asyncio's) cancels its run
        in order, or, with none, KeyboardInterrupt comes here."""
        self.stopped_by = ExitCode.TERMINATED
        signal.raise_signal(signal.SIGINT)

    def exited(self, exc: SystemExit) -> int:
        """The file exited (``sys.exit``): report what it ran; with nothing run, it could not
        be loaded (an argument check that failed, say): say so with what it said, exit 3."""
        if self.runs():
            return self.report()
        self.terminal.notice(f"agent run: {workflow.exited_while_loading(self.args.file, exc, ', before any run')}")
        return ExitCode.LOAD_FAILED

    async def drive(self) -> int:
        """On the command's loop: the file's top-level ``await`` part, then the run, then the report."""
        assert self.wf is not None
        loop = asyncio.get_running_loop()
        self.main_task = asyncio.current_task()
        self.terminal.on_reader_gone = lambda: loop.call_soon_threadsafe(self.on_reader_gone)
        loop.add_signal_handler(signal.SIGINT, self.on_interrupt)
        loop.add_signal_handler(signal.SIGTERM, self.on_terminate)  # systemctl stop: as Ctrl-C
        try:
            if self.wf.awaiting is not None:
                try:
                    await self.wf.awaiting
                except asyncio.CancelledError:
                    if self.interrupts:
                        return self.report(interrupted=True)
                    raise
                except SystemExit as exc:
                    return self.exited(exc)
                except Exception as exc:
                    return self.failed_while_loading(exc)
            if self.runs():
                return self.report()
            return await self.run_agent()
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)

    async def run_agent(self) -> ExitCode:
        args = self.args
        try:
            agent = self.pick_agent()
        except LookupError as exc:
            return self.load_failed(str(exc))
        self.cli_agent = agent
        if args.isolation:
            from ..executor import Isolation

            try:
                agent.isolation = Isolation.parse(args.isolation)
            except AgentError as exc:  # e.g. ray without Ray installed
                return self.usage(str(exc))
        try:
            store = self.store_for(agent)
        except (LookupError, CheckpointError) as exc:
            return self.usage(str(exc))
        try:
            if args.resume:
                await agent.resume_run(args.resume, store, timeout=args.timeout)
            else:
                await agent.run(timeout=args.timeout)
        except asyncio.CancelledError:
            if self.interrupts:
                return self.report(interrupted=True)
            raise
        except WorkflowDefinitionError as exc:
            if not self.runs():  # refused before anything ran: the workflow, not the run
                return self.load_failed(str(exc))
        except AgentError as exc:
            if not self.runs():  # refused before anything ran (another agent's run to resume)
                return self.usage(str(exc)) if args.resume else self.load_failed(str(exc))
            # else the summary says what failed
        else:
            if args.resume and not self.runs():
                return self.already_completed(args.resume)
        return self.report()

    def already_completed(self, run_id: str) -> ExitCode:
        """``--resume`` of a run that had completed: nothing ran, and nothing is wrong."""
        if self.progress is not None:
            self.progress.stop()
        if self.args.json:  # the summary's fields, as the checkpoint has them (no time: nothing ran)
            from ..live.snapshot import describe

            agent = self.cli_agent
            store = agent.checkpoint_store
            snap = describe(agent, 0.0, 0.0)
            document = {
                "agent": agent.name, "run_id": run_id, "status": "completed", "elapsed": None,
                "counts": snap["states"], "states": {n: m.status.value for n, m in agent.state_metadata.items()},
                "failed": snap["failed"], "error": None, "store": getattr(getattr(store, "inner", store), "path", None),
                "resume_command": None, "context_keys": sorted(agent.context.keys()), "resumed": False,
            }
            self.terminal.write(self.terminal.out, json.dumps(document, indent=2, default=str) + "\n")
        self.terminal.notice(f"agent run: run {run_id} had completed: nothing to resume")
        return ExitCode.OK

    # --- choosing the agent and its store ---------------------------------------------------

    def pick_agent(self) -> Any:
        assert self.wf is not None
        agents = self.wf.find_agents()
        path, name = self.args.file, self.args.agent
        if name is not None:
            for value in agents.values():
                if value.name == name:
                    return value
            if name in agents:
                return agents[name]
            raise LookupError(f"{path} defines no agent named {name!r} (it has: "
                              f"{', '.join(a.name for a in agents.values()) or 'none'})")
        if not agents:
            if self.wf.has_main_block:
                raise LookupError(f"{path} defines no Agent at module level; it runs its workflow in an "
                                  f"`if __name__ == \"__main__\":` block, which agent run skips: use `python {path}`")
            raise LookupError(f"{path} defines no Agent at module level: assign one, e.g. "
                              "`agent = Agent(\"my_flow\")`")
        if len(agents) > 1 and "agent" not in agents:
            raise LookupError(f"{path} defines several agents ({', '.join(a.name for a in agents.values())}): "
                              "pick one with --agent NAME")
        return agents.get("agent") or next(iter(agents.values()))

    def store_for(self, agent: Any) -> Any:
        """The store the run is saved to (None with ``--no-store``); with ``--resume`` it must hold the run."""
        from ..checkpoint_store import SQLiteCheckpointStore, default_store_path
        from ..errors import CheckpointError

        args = self.args
        store = agent.checkpoint_store
        if store is not None and args.store:
            self.terminal.notice(f"agent run: {args.file}'s agent saves to its own store "
                                 f"({getattr(store, 'path', store)}); --store is not used")
        if store is None and not args.no_store:
            path = Path(args.store) if args.store else default_store_path()
            if args.resume and (not path.exists() or path.stat().st_size == 0):  # an empty file holds no run
                raise LookupError(f"no run {args.resume!r}: there is no checkpoint store at {path} "
                                  "(`agent runs` lists the runs it finds)")
            try:
                store = SQLiteCheckpointStore(path)
            except (OSError, CheckpointError) as exc:
                if args.store or args.resume:
                    raise
                # The default store is a convenience: a home that cannot be written to
                # (a service account, HOME=/nonexistent) must not stop the run.
                self.terminal.notice(f"agent run: not saving this run ({path}: {exc}); "
                                     "pass --store PATH to make it resumable")
                return None
            agent.checkpoint_store = BestEffortStore(store, self.terminal)
        if args.resume:
            if store is None:
                raise LookupError("--resume needs a checkpoint store: drop --no-store")
            if store.latest(args.resume) is None:
                where = getattr(getattr(store, "inner", store), "path", repr(store))
                raise LookupError(f"no checkpoint for run {args.resume!r} in {where} "
                                  "(`agent runs` lists the runs it finds)")
            from ..live.client import live_run_ids

            if args.resume in live_run_ids(running_only=True):
                raise LookupError(f"run {args.resume!r} is still running in another process (`agent runs` "
                                  "shows it): resume it once that process has stopped")
        return agent.checkpoint_store

    # --- Ctrl-C ------------------------------------------------------------------------------

    def on_interrupt(self, again: str = "Ctrl-C again") -> None:
        self.interrupts += 1
        if self.interrupts > 1 or self.main_task is None:
            self.terminal.notice("agent run: stopping now")
            self.keep_paused()
            from ..supervisor.service import current_supervisor

            supervisor = current_supervisor()
            if supervisor is not None:
                supervisor.kill_all()
            if self.main_task is not None:
                self.main_task.cancel()
            return
        self.terminal.notice("agent run: pausing: running states stop and will run again on resume "
                             f"({again} to stop at once)")
        asyncio.get_running_loop().create_task(self.pause_then_stop())

    def on_terminate(self) -> None:
        """SIGTERM (``systemctl stop``, ``kill``): pause as for Ctrl-C, and exit 143."""
        self.stopped_by = ExitCode.TERMINATED
        self.on_interrupt(again="a second SIGTERM")

    def on_reader_gone(self) -> None:
        """stdout's reader went away (``agent run flow.py | head``): pause as for SIGTERM, exit 141."""
        from ..status import AgentStatus

        if self.interrupts or not any(e.agent is not None and e.agent.status is AgentStatus.RUNNING
                                      for e in self.runs()):
            return  # stopping already, or over (it then exits 141 all the same)
        self.stopped_by = ExitCode.READER_GONE
        self.on_interrupt(again="Ctrl-C")

    def keep_paused(self) -> None:
        """A second signal cuts a pause short: each run still pausing is saved as paused now,
        its running states to run again on resume, and saves nothing more (stopping it at
        once cancels what still runs, which is no state's outcome)."""
        from ..status import AgentStatus

        for entry in self.runs():
            agent = entry.agent
            # (A pause under way says PAUSED already, while its states still stop.)
            if agent is None or agent.status not in (AgentStatus.RUNNING, AgentStatus.PAUSED) \
                    or agent.checkpoint_store is None:
                continue
            if agent.status is AgentStatus.RUNNING:
                agent._set_status(AgentStatus.PAUSED)
            checkpoint = agent.create_checkpoint()
            self.paused_as(agent, checkpoint)
            agent._save_checkpoint(checkpoint)
            if not isinstance(agent.checkpoint_store, BestEffortStore):
                agent.checkpoint_store = BestEffortStore(agent.checkpoint_store, self.terminal)
            agent.checkpoint_store.stop_saving()

    def paused_as(self, agent: Any, checkpoint: AgentCheckpoint) -> None:
        """Keep what ``agent``'s pause left to run on resume (the summary shows it)."""
        self.to_run_again[agent.run_id] = {*checkpoint.pending_states, *checkpoint.running_states}
        self.paused_statuses[agent.run_id] = {n: m["status"] for n, m in checkpoint.state_metadata.items()}

    async def pause_then_stop(self) -> None:
        from ..status import AgentStatus

        agents = [e.agent for e in self.runs() if e.agent is not None and e.agent.status is AgentStatus.RUNNING]
        checkpoints = await asyncio.gather(*(a.pause() for a in agents), return_exceptions=True)
        for agent, checkpoint in zip(agents, checkpoints):
            if isinstance(checkpoint, AgentCheckpoint):
                self.paused_as(agent, checkpoint)
        if self.main_task is not None:
            self.main_task.cancel()

    # --- reporting --------------------------------------------------------------------------

    def runs(self) -> list[live.LiveRun]:
        return [e for e in live.runs() if e.started >= self.since]

    def usage(self, message: str) -> ExitCode:
        self.terminal.notice(f"agent run: {message}")
        return ExitCode.USAGE

    def load_failed(self, message: str) -> ExitCode:
        separator = "\n" if "\n" in message else " "
        self.terminal.notice(f"agent run: cannot run {self.args.file}:{separator}{message}")
        return ExitCode.LOAD_FAILED

    def failed_while_loading(self, exc: BaseException) -> ExitCode:
        if self.runs() and isinstance(exc, AgentError):
            return self.report()  # the file ran its agent itself, and that run failed
        filename = str(self.file.resolve()) if self.file is not None else ""
        self.terminal.notice(f"agent run: cannot load {self.args.file}:\n{workflow.user_traceback(exc, filename)}")
        return ExitCode.LOAD_FAILED

    def report(self, *, interrupted: bool = False) -> ExitCode:
        if self.progress is not None:
            self.progress.stop()  # the summary replaces the progress line
        entries = self.runs()
        if not entries:
            self.terminal.notice("agent run: interrupted before any run started" if interrupted
                                 else "agent run: nothing ran")
            return self.stopped_by if interrupted else ExitCode.LOAD_FAILED
        primary = next((e for e in reversed(entries) if e.agent is self.cli_agent), entries[-1])
        summaries = [self.summarize(e, interrupted) for e in entries]
        main = summaries[entries.index(primary)]
        if self.args.json:
            for summary in summaries:
                if summary["error"] and summary["status"] == "failed":
                    self.terminal.notice(f"agent run: {summary['error']}")
            document = dict(main)
            others = [s for s in summaries if s is not main]
            if others:
                document["other_runs"] = others
            self.terminal.write(self.terminal.out, json.dumps(document, indent=2, default=str) + "\n")
        else:
            for summary in summaries:
                self.print_summary(summary)
        if interrupted:
            return self.stopped_by
        return {"completed": ExitCode.OK, "cancelled": ExitCode.CANCELLED}.get(main["status"], ExitCode.RUN_FAILED)

    def summarize(self, entry: live.LiveRun, interrupted: bool) -> dict[str, Any]:
        agent = entry.agent
        snap = entry.snapshot() or {}
        store = getattr(agent, "checkpoint_store", None)
        store_path = getattr(getattr(store, "inner", store), "path", None)
        status = snap.get("status", "unknown")
        resume = None
        if interrupted and status in ("paused", "cancelled", "running"):
            status = "paused" if store_path and _mark_paused(store, entry.run_id) else "stopped"
        if status in ("paused", "failed") and store_path:  # a failed run resumes at what failed
            resume = self.resume_command(entry.run_id, agent)
        error = agent.last_error if agent is not None else None
        tally = dict(snap.get("states", {}))
        states = {n: m.status.value for n, m in agent.state_metadata.items()} if agent is not None else {}
        if status == "paused":  # the states it stopped run again on resume: pending, as after pause()
            again = {n for n, s in states.items() if s == "cancelled" and n in self.to_run_again.get(entry.run_id, ())}
            states = {n: "pending" if n in again else s for n, s in states.items()}
            moved = len(again)
            tally["to_run_again"] = moved
            tally["cancelled"] = max(0, tally.get("cancelled", 0) - moved)
            # Blocked by the stop that followed the pause (a dependency of theirs was stopped):
            # they wait on resume as they did at the pause.
            before = self.paused_statuses.get(entry.run_id, {})
            waiting = {n for n, s in states.items() if s == "blocked" and before.get(n, "blocked") != "blocked"}
            states = {n: before[n] if n in waiting else s for n, s in states.items()}
            if waiting:
                tally["blocked"] = max(0, tally.get("blocked", 0) - len(waiting))
                tally["pending"] = tally.get("pending", 0) + len(waiting)
        return {
            "agent": snap.get("agent"),
            "run_id": entry.run_id,
            "status": status,
            "elapsed": snap.get("elapsed"),
            "counts": tally,
            "states": states,
            "failed": snap.get("failed", []),
            "error": str(error) if error is not None else None,
            "store": store_path,
            "resume_command": resume,
            "context_keys": sorted(agent.context.keys()) if agent is not None else [],
        }

    def resume_command(self, run_id: str, agent: Any) -> str | None:
        if self.wf is not None and self.wf.runs_itself:
            return None  # the file starts a new run whenever it is loaded
        args = self.args
        command = f"agent run {shlex.quote(args.file)}"
        own_store = agent is not None and not isinstance(agent.checkpoint_store, BestEffortStore)
        if not own_store and args.store:
            command += f" --store {shlex.quote(str(args.store))}"
        if args.agent:
            command += f" --agent {shlex.quote(args.agent)}"
        if args.isolation:  # the rest runs where the start ran
            command += f" --isolation {shlex.quote(str(args.isolation))}"
        if args.timeout is not None:
            command += f" --timeout {args.timeout:g}"
        command += f" --resume {run_id}"
        if self.args.args:  # the file may need them to build its agent again
            command += " -- " + " ".join(shlex.quote(a) for a in self.args.args)
        return command

    def print_summary(self, summary: dict[str, Any]) -> None:
        elapsed = duration(summary["elapsed"]) if summary["elapsed"] is not None else "?"
        line = f"{printable(summary['agent'])} {summary['status']} after {elapsed}: {counts(summary['counts'])}"
        self.terminal.notice(f"agent run: {line} (run {summary['run_id']})")
        if summary["error"] and summary["status"] == "failed":
            self.terminal.notice(f"agent run: {summary['error']}")
        if summary["resume_command"]:
            self.terminal.notice(f"agent run: resume it with: {summary['resume_command']}")
        elif summary["status"] in ("paused", "stopped"):
            why = "it was not saved to a checkpoint store" if not summary["store"] else (
                "the file starts a new run whenever it is loaded; resume it in code: "
                f"await agent.resume_run({summary['run_id']!r})")
            self.terminal.notice(f"agent run: the run cannot be resumed from here: {why}")


def check_store_directory(store: str) -> None:
    """Refuse ``--store PATH`` in a directory that does not exist: the command creates the
    file (a new store), never directories (a mistyped path would scatter them)."""
    directory = Path(store).parent
    if not directory.is_dir():
        raise ValueError(f"--store {store}: no directory {directory}: create it first, or give a file "
                         "in an existing directory")


def _mark_paused(store: Any, run_id: str) -> bool:
    """Record in ``store`` that the interrupted run is paused (resumable); False if it cannot."""
    try:
        checkpoint = store.latest(run_id)
        if checkpoint is None:
            return False
        if checkpoint.agent_status != "paused":
            checkpoint.agent_status = "paused"
            store.save(run_id, checkpoint)
    except CheckpointError:
        return False
    return True


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Close the command's loop as ``asyncio.run`` would: tasks the workflow left are cancelled first."""
    try:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _uvloop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def run_command(args: argparse.Namespace) -> int:
    return RunCommand(args)()
