"""AGENT_PRELOAD: modules the zygote imports once, which every state's process inherits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    sys.path.insert(0, sys.argv[1])  # where the workload's module lives
    from agent.context import Context
    from agent.executor import Attempt, Isolation
    from agent.supervisor import current_supervisor, get_executor

    async def state(context):
        import workload
        return {"loaded_in": workload.LOADED_IN, "me": os.getpid()}

    async def main():
        executor = get_executor(Isolation.PROCESS)
        results = []
        for n in range(3):
            attempt = Attempt("run", "agent", "state", state, n + 1, context=Context(),
                              isolation=Isolation.PROCESS)
            results.append((await executor.run_attempt(attempt)).result)
        print(json.dumps({"zygote": current_supervisor().zygote.pid, "results": results}))

    asyncio.run(main())
    """
)


def run_workflow(tmp_path: Path, module_code: str, preload: str | None) -> tuple[dict, str, list[str]]:
    (tmp_path / "workload.py").write_text(textwrap.dedent(module_code))
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("AGENT_PRELOAD", None)
    if preload is not None:
        env["AGENT_PRELOAD"] = preload
    done = subprocess.run([sys.executable, "-P", "-c", SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imports = (tmp_path / "imports").read_text().split() if (tmp_path / "imports").exists() else []
    return json.loads(done.stdout), done.stderr, imports


RECORDING_MODULE = """
    import os
    LOADED_IN = os.getpid()
    with open(os.path.join(os.path.dirname(__file__), "imports"), "a") as f:
        f.write(f"{LOADED_IN}\\n")
"""


class TestPreload:
    def test_preloaded_module_is_imported_once_in_the_zygote(self, tmp_path):
        out, _, imports = run_workflow(tmp_path, RECORDING_MODULE, preload="json, workload")
        assert imports == [str(out["zygote"])]
        assert {r["loaded_in"] for r in out["results"]} == {out["zygote"]}
        assert all(r["me"] != out["zygote"] for r in out["results"])

    def test_without_preload_each_process_imports_it(self, tmp_path):
        out, _, imports = run_workflow(tmp_path, RECORDING_MODULE, preload=None)
        assert sorted(imports) == sorted(str(r["me"]) for r in out["results"])
        assert all(r["loaded_in"] == r["me"] for r in out["results"])

    def test_module_that_cannot_be_imported_is_reported_and_skipped(self, tmp_path):
        out, stderr, imports = run_workflow(tmp_path, RECORDING_MODULE, preload="no_such_module,workload")
        assert "AGENT_PRELOAD: cannot import 'no_such_module' (ModuleNotFoundError" in stderr
        assert imports == [str(out["zygote"])]

    def test_module_starting_a_thread_is_reported_and_children_still_run(self, tmp_path):
        threaded = RECORDING_MODULE + """
    import threading
    threading.Thread(target=threading.Event().wait, daemon=True).start()
"""
        out, stderr, imports = run_workflow(tmp_path, threaded, preload="workload")
        assert "importing 'workload' started 1 thread(s) in the zygote" in stderr
        assert {r["loaded_in"] for r in out["results"]} == {out["zygote"]}
