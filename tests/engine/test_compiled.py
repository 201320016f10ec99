"""The engine modules setup.py compiles with mypyc, and the guard against stale compiled copies."""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.machinery
import os
import pickle
import shutil
import sys
import sysconfig

import pytest

from agent import Priority, ResourceRequirements, _compiled
from agent.state import AttemptRecord, StateMetadata
from agent.status import StateStatus
from agent.workflow import StateSpec

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


def _noop_state(context):  # module level: pickled by reference
    return None


@pytest.mark.parametrize("copy_of", [copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["copy", "deepcopy", "pickle"])
def test_the_compiled_classes_copy_and_pickle_with_every_field(copy_of):
    # Compiled, a class cannot be made without its constructor's arguments: copy and
    # pickle go through each one's __reduce__, which must carry every field.
    record = AttemptRecord(2, 1.0, 3.5, "failed", "boom", {"cpu_seconds": 0.5})
    meta = StateMetadata("fetch", max_retries=3, priority=Priority.HIGH)
    meta.status = StateStatus.COMPLETED
    meta.runs, meta.total_attempts, meta.last_success = 1, 2, 12.5
    meta.usage = {"peak_memory_mb": 7.0}
    meta.record(record)
    spec = StateSpec("fetch", _noop_state, {}, ResourceRequirements(cpu_units=1.0), None, 2, None, 5.0,
                     Priority.HIGH, frozenset({"next"}), "continue", ("a", "b*"))
    for original in (record, meta, spec):
        copied = copy_of(original)
        assert type(copied) is type(original)
        assert dataclasses.asdict(copied) == dataclasses.asdict(original)
    assert copy_of(meta).state_id == meta.state_id


def test_each_state_has_its_own_state_id_for_good():
    first, second = StateMetadata("a"), StateMetadata("a")
    ids = {first.state_id, second.state_id}
    assert len(ids) == 2 and first.state_id in ids  # distinct, and the same at each read
    assert first.to_dict()["state_id"] == first.state_id
    assert pickle.loads(pickle.dumps(second)).state_id == second.state_id
    assert copy.copy(StateMetadata("b")).state_id != first.state_id  # copied before it was read
