"""The program's ``__main__`` as a state's process sees it.

A state written in the script that runs the workflow travels to its process by value
(cloudpickle), with the functions and classes of the script it uses. There, ``__main__``
was the zygote: :mod:`pickle` could not find ``__main__.helper``, so a
``multiprocessing.Pool`` or ``ProcessPoolExecutor`` inside the state failed on the
script's own functions, and a pool that spawns would have started the zygote's module
instead of the script. So a state's process gets a stand-in ``__main__`` that names the
program's script the way :mod:`multiprocessing` reads it (its ``__file__``, or the module
of ``python -m``) and holds what each state brought from it: the state's own function,
and the functions, classes and values of the script it refers to. The script's functions
also get its file name back (cloudpickle names code it copies ``<dynamic-code>``), so a
traceback from a state points at the script's lines, as it would inline.
"""

from __future__ import annotations

import builtins
import sys
import types
from importlib.machinery import ModuleSpec
from typing import Any

from ..values import WORKFLOW_MODULE

_MARK = "__agent_stand_in__"
_SCRIPT = frozenset({"__main__", WORKFLOW_MODULE})  # the script: python flow.py, or agent run flow.py
_files: dict[str, str] = {}  # the file of each of those modules, in a state's process (stand_in)
_workflow_file: str | None = None  # the workflow agentd's runner loaded (it registers no module)


def note_workflow(path: str) -> None:
    """Say which file the workflow module's code comes from, where no module holds it."""
    global _workflow_file
    _workflow_file = path


def describe() -> dict[str, str | None]:
    """What names this program's ``__main__`` (read by the supervisor, for its children), and
    the file of the workflow module ``agent run`` loads, when one is loaded."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return {"file": getattr(main, "__file__", None), "module": getattr(spec, "name", None),
            "workflow": getattr(sys.modules.get(WORKFLOW_MODULE), "__file__", None) or _workflow_file}


def stand_in(described: dict[str, Any] | None) -> None:
    """Make this process's ``__main__`` a stand-in for the program's (see :func:`describe`)."""
    main = types.ModuleType("__main__")
    described = described or {}
    if described.get("file"):
        main.__file__ = described["file"]
    module = described.get("module")
    main.__spec__ = ModuleSpec(module, None) if module else None
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    setattr(main, _MARK, True)
    sys.modules["__main__"] = main
    _note_files(described)


def _note_files(described: dict[str, Any]) -> None:
    _files.clear()
    for module, key in (("__main__", "file"), (WORKFLOW_MODULE, "workflow")):
        if described.get(key):
            _files[module] = str(described[key])


def adopt(*objects: Any) -> None:
    """Put what a state brought from the program's ``__main__`` into the stand-in: each of
    ``objects`` defined there, and what a function of them refers to in the script."""
    main = sys.modules.get("__main__")
    if main is None or not getattr(main, _MARK, False):
        return  # not a state's process (the zygote warming up), or none made
    space = main.__dict__
    for obj in objects:
        if getattr(obj, "__module__", None) not in _SCRIPT:
            continue
        scope = getattr(obj, "__globals__", None)
        if isinstance(scope, dict):
            for name, value in scope.items():
                if not name.startswith("__"):
                    space[name] = value
                    _name_file(value)
        _name_file(obj)
        if "<" not in getattr(obj, "__qualname__", "<"):  # defined at the script's top level
            space[obj.__name__] = obj


_COPIED = "<dynamic-code>"  # what cloudpickle names the file of code it copied


def name_script_file(func: Any, described: dict[str, Any] | None) -> None:
    """Give ``func`` (a state copied from the program's script) and the script's functions it
    refers to their file name back, where no stand-in ``__main__`` is made (a Ray task;
    ``described`` is the driver's :func:`describe`)."""
    if not described or getattr(func, "__module__", None) not in _SCRIPT:
        return
    _note_files(described)
    scope = getattr(func, "__globals__", None)
    if isinstance(scope, dict):
        for name, value in scope.items():
            if not name.startswith("__"):
                _name_file(value)
    _name_file(func)


def _name_file(obj: Any) -> None:
    """Give a function of the script copied by cloudpickle its file name back: the file of
    its own module (nothing when that file is not known: better no file than another's)."""
    if isinstance(obj, types.FunctionType) and obj.__code__.co_filename == _COPIED:
        script = _files.get(obj.__module__)
        if script:
            obj.__code__ = _renamed(obj.__code__, script)


def _renamed(code: types.CodeType, script: str) -> types.CodeType:
    consts = tuple(_renamed(c, script) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=script, co_consts=consts)
