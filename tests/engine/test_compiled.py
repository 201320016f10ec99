"""The engine modules setup.py compiles with mypyc, and the guard against stale compiled copies."""

from __future__ import annotations

import ast
import importlib.machinery
import os
import shutil
import sys
import sysconfig

import pytest

from agent import _compiled

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_list() -> list[str]:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMPILED" for t in node.targets):
            return ast.literal_eval(node.value)  # type: ignore[no-any-return]
    raise AssertionError("setup.py has no COMPILED list")


def test_setup_compiles_exactly_the_modules_the_guard_checks():
    assert [path.removesuffix(".py").replace("/", ".") for path in _setup_list()] == list(_compiled.COMPILED)


def test_this_install_runs_the_compiled_modules_where_it_can():
    # A compile that failed leaves a working but slower package (setup.py): say so here.
    if os.environ.get("AGENT_PURE_PYTHON") == "1":
        pytest.skip("AGENT_PURE_PYTHON=1: installed as pure Python")
    if shutil.which("cc") is None or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no C compiler or Python headers here: installed as pure Python")
    assert [module for module in _compiled.COMPILED if _compiled.compiled_path(module) is None] == []


def test_a_source_edited_after_compiling_is_named_stale(tmp_path, monkeypatch):
    package = tmp_path / "stalepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = package / "hot.py"
    source.write_text("X = 1\n")
    compiled = package / ("hot" + importlib.machinery.EXTENSION_SUFFIXES[0])
    compiled.write_bytes(b"")  # located, never loaded
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_compiled, "COMPILED", ("stalepkg.hot", "stalepkg.plain"))
    (package / "plain.py").write_text("Y = 2\n")  # not compiled here: never stale
    os.utime(source, (1_000_000, 1_000_000))
    os.utime(compiled, (2_000_000, 2_000_000))
    try:
        assert _compiled.compiled_path("stalepkg.hot") == str(compiled)
        assert _compiled.compiled_path("stalepkg.plain") is None
        assert _compiled.stale() == []
        os.utime(source, (3_000_000, 3_000_000))  # edited after it was compiled
        assert _compiled.stale() == ["stalepkg.hot"]
    finally:
        sys.modules.pop("stalepkg", None)
