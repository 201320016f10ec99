"""Loading a workflow file for ``agent run``: top-level ``await``, by-value pickling, the user's traceback.

The file is compiled with top-level ``await`` allowed (the spec's Quick Start ends in
``await agent.run()``) and executed as the module ``__agent_workflow__``, not
``__main__``: an ``if __name__ == "__main__":`` block does not run, so a file that runs
its agent under that guard for ``python flow.py`` is run by ``agent run`` itself, with
its options. The module stays in ``sys.modules`` (also as ``__main__``, so classes
saved in checkpoints by ``python flow.py`` resolve) and is registered with cloudpickle
to be pickled by value: a state's process cannot import it, so it receives the
functions' code instead.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import traceback
import types
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._compiled import framework_file
from ..errors import AgentError
from ..values import WORKFLOW_MODULE

MODULE_NAME = WORKFLOW_MODULE


class WorkflowLoadError(Exception):
    """The file could not be loaded; ``str()`` is what to show the user (their own traceback)."""


@dataclass
class Workflow:
    """A loaded workflow file."""

    path: Path
    module: types.ModuleType
    awaiting: Coroutine[Any, Any, Any] | None = None
    """The file's top-level code when it uses ``await``: run it on the CLI's event loop."""
    runs_itself: bool = False
    """Whether the file's top-level code starts a run (``await agent.run()``, ``run_sync()``)."""
    has_main_block: bool = False
    """Whether it has an ``if __name__ == "__main__":`` block (which is not run)."""
    agents: dict[str, Any] = field(default_factory=dict)

    def find_agents(self) -> dict[str, Any]:
        from ..agent import Agent

        self.agents = {k: v for k, v in vars(self.module).items() if isinstance(v, Agent)}
        return self.agents


def check_file(path: str) -> Path:
    """``path`` as a readable Python file; a :class:`ValueError` says what is wrong with it."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"{path}: no such file")
    if file.is_dir():
        raise ValueError(f"{path} is a directory: give the Python file that defines the Agent")
    if not os.access(file, os.R_OK):
        raise ValueError(f"{path}: permission denied")
    return file


def parse(path: Path) -> ast.Module:
    """The file's syntax tree (top-level ``await`` allowed); a syntax error is a WorkflowLoadError."""
    try:
        return compile(path.read_bytes(), str(path.resolve()), "exec",
                       flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    except SyntaxError as exc:
        raise WorkflowLoadError("".join(traceback.format_exception_only(type(exc), exc)).rstrip()) from None


def load(path: Path, argv: list[str]) -> Workflow:
    """Compile and execute ``path`` (all but a top-level-``await`` part, returned to await)."""
    filename = str(path.resolve())
    tree = parse(path)
    code = compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = filename
    sys.modules[MODULE_NAME] = module
    sys.modules["__main__"] = module
    _pickle_by_value(module)
    sys.argv[:] = [str(path), *argv]
    sys.path.insert(0, str(path.resolve().parent))
    workflow = Workflow(path=path, module=module, runs_itself=starts_a_run(tree),
                        has_main_block=any(_is_main_guard(stmt) for stmt in tree.body))
    if code.co_flags & inspect.CO_COROUTINE:
        workflow.awaiting = eval(code, module.__dict__)  # noqa: S307 - the user's own file
    else:
        exec(code, module.__dict__)  # noqa: S102 - the caller shows what it raises as the user's traceback
    return workflow


def starts_a_run(tree: ast.Module) -> bool:
    """Whether module-level code (outside ``if __name__ == "__main__":``) awaits or calls a run."""
    body = [stmt for stmt in tree.body if not _is_main_guard(stmt)]
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(stmt):
            if isinstance(node, ast.Await) and _method(node.value) in ("run", "resume", "resume_run"):
                return True
            if _method(node) == "run_sync":
                return True
    return False


def without_its_runs(tree: ast.Module) -> ast.Module:
    """``tree`` less its module-level statements that only start a run (``await agent.run()``,
    ``agent.run_sync()``): for agentd, which runs the file's agent itself."""
    tree.body = [stmt for stmt in tree.body if not (isinstance(stmt, ast.Expr) and _starts_a_run(stmt.value))]
    return tree


def _starts_a_run(node: ast.AST) -> bool:
    if isinstance(node, ast.Await):
        return _method(node.value) in ("run", "resume", "resume_run")
    return _method(node) == "run_sync"


def _method(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _is_main_guard(stmt: ast.stmt) -> bool:
    if not isinstance(stmt, ast.If) or not isinstance(stmt.test, ast.Compare):
        return False
    names = [stmt.test.left, *stmt.test.comparators]
    return any(isinstance(n, ast.Name) and n.id == "__name__" for n in names) and any(
        isinstance(n, ast.Constant) and n.value == "__main__" for n in names
    )


def exited_while_loading(file: str, exc: SystemExit, when: str = "") -> str:
    """What to say of ``file`` calling ``sys.exit()`` as it was loaded (``when``: more of
    that moment), with what it said."""
    said = "" if exc.code is None or isinstance(exc.code, int) else f": {exc.code}"
    return f"{file} exited while it was loaded{when} (sys.exit({exc.code!r})){said}"


def user_traceback(exc: BaseException, filename: str) -> str:
    """``exc`` as Python prints it, without the frames of ``agent run`` above the user's file
    (nor, for the framework's own errors, the framework's frames below it)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith("<frozen importlib")]
    if isinstance(exc, AgentError):  # the framework's message says it all: not its own frames
        frames = [f for f in frames if not framework_file(f.filename)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


def _pickle_by_value(module: types.ModuleType) -> None:
    import cloudpickle

    try:
        cloudpickle.register_pickle_by_value(module)
    except ValueError:  # registered already (a second load in one process)
        pass
