"""Build: the engine's hot modules are compiled to C with mypyc when this machine can.

What a run does per state (its bookkeeping in ``agent/engine/run.py``, each state's
``StateSpec`` and ``StateMetadata``, each grant and release of resources in
``agent/engine/admission.py`` and ``agent/_ledger.py``) runs about 1.5x faster
compiled. The compiled modules are the same source, checked by mypy; without a C
compiler, or with ``AGENT_PURE_PYTHON=1``, the package installs as pure Python and
behaves the same.
An editable install puts the compiled modules beside their sources: after editing one of
them, install again (``scripts/install.sh``), or the old compiled one keeps running
(the test suite refuses to start then).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Keep in step with agent/_compiled.py (COMPILED), which checks them for staleness.
COMPILED = [
    "agent/engine/run.py", "agent/engine/admission.py", "agent/state.py", "agent/workflow.py", "agent/_ledger.py",
]


class OptionalBuildExt(build_ext):
    """Compile when possible: a machine without a C toolchain gets pure Python (all of it:
    a compiled module without the shared library its code lives in would not import)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure leaves pure Python
            for ext in self.extensions:
                built = self.get_ext_fullpath(ext.name)
                if os.path.exists(built):
                    os.remove(built)
            print(f"agent: compiling {', '.join(COMPILED)} failed ({exc}); installing pure Python", file=sys.stderr)


def ext_modules() -> list[Extension]:
    if os.environ.get("AGENT_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("agent: mypyc is not installed; installing pure Python", file=sys.stderr)
        return []
    return mypycify(COMPILED, opt_level="3")


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
