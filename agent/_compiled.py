"""The modules ``setup.py`` compiles with mypyc, and whether this install runs them compiled.

An editable install puts each compiled module beside its source, and Python imports the
compiled one first: after an edit, the source and what runs differ until the next
install. :func:`stale` names such modules, so that the test suite can refuse to run them.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

COMPILED = ("agent.engine.run", "agent.engine.admission", "agent.state", "agent.workflow", "agent._ledger")


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def framework_file(filename: str) -> bool:
    """Whether a traceback frame's ``filename`` is this package's: by its path, or, for a
    module compiled with mypyc, by the relative name its frames carry (``agent/workflow.py``)."""
    return filename.startswith(_PACKAGE) or (not os.path.isabs(filename) and filename.startswith("agent/"))


def compiled_path(module: str) -> str | None:
    """The compiled file this install would import for ``module``, if any (importing nothing but its package)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return None
    return spec.origin


def stale() -> list[str]:
    """The compiled modules whose source changed after they were compiled."""
    out = []
    for module in COMPILED:
        path = compiled_path(module)
        if path is None:
            continue
        source = os.path.join(os.path.dirname(path), module.rpartition(".")[2] + ".py")
        if os.path.exists(source) and os.path.getmtime(source) > os.path.getmtime(path):
            out.append(module)
    return out
