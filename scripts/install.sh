#!/usr/bin/env bash
# Create (or update) this checkout's virtual environment and install the package into it.
#   scripts/install.sh [extras]      e.g. scripts/install.sh test,monitor,gpu
#   scripts/install.sh --service     also install agentd as a systemd service and start it
# The venv is $AGENT_VENV, default <checkout>/.venv, built from Debian's /usr/bin/python3
# when present (installing python3-venv with apt if the venv module is missing, as root).
# The package is installed in editable mode (its distribution name is agent-isolation, its
# import name agent), with the `agent` command, its hot modules compiled beside their sources
# (setup.py; AGENT_PURE_PYTHON=1: not compiled). A venv that already runs the agent
# package of another checkout is left alone (the script stops), so two checkouts never
# re-point each other's venv, unless that checkout is gone or AGENT_VENV_ADOPT=1 says the
# venv follows whichever checkout installs into it (CI's shared venv). Prints the venv path last.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
service=
if [ "${1:-}" = "--service" ]; then service=1; shift; fi
extras=${1:-}
venv=${AGENT_VENV:-$here/.venv}
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)

if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "install: Python >= 3.11 is required ($python is too old)" >&2
    exit 1
fi
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "install: the venv module is missing: install python3-venv" >&2
        exit 1
    fi
fi
if [ -x "$venv/bin/python" ]; then
    # Where the venv imports `agent` from now (-I: not from the current directory).
    other=$("$venv/bin/python" -I - "$here" <<'PY' 2>/dev/null || true
import importlib.util, os, sys
spec = importlib.util.find_spec("agent")
if spec is not None and spec.origin:
    root = os.path.dirname(os.path.dirname(os.path.realpath(spec.origin)))
    if root != os.path.realpath(sys.argv[1]):
        print(root)
PY
)
    if [ -n "$other" ] && [ -e "$other/agent/__init__.py" ] && [ "${AGENT_VENV_ADOPT:-0}" != 1 ]; then
        echo "install: $venv runs the agent package of $other, not of $here: leaving it alone;" \
             "set AGENT_VENV to a venv of this checkout (or AGENT_VENV_ADOPT=1 to re-point it)" >&2
        exit 1
    fi
    # agent-framework was this project's old distribution name: drop it when it is this checkout.
    old_name=$("$venv/bin/python" -I -m pip show agent-framework 2>/dev/null || true)
    if grep -qx "Editable project location: $here" <<<"$old_name"; then
        "$venv/bin/python" -I -m pip uninstall -q -y agent-framework >/dev/null
    fi
else
    "$python" -m venv "$venv"
fi
chmod 755 "$venv" 2>/dev/null || true
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
# The engine's hot modules are compiled with mypyc (setup.py): that needs a C compiler and
# Python's headers. Without them (or with AGENT_PURE_PYTHON=1) the package is pure Python.
# The compiled copies of an earlier install go first: one whose module is no longer compiled
# would go on shadowing its source.
find "$here/agent" -name '*.so' -delete
rm -f "$here"/*__mypyc.*.so
if [ "${AGENT_PURE_PYTHON:-0}" = 1 ]; then
    :
elif ! command -v cc >/dev/null || ! "$python" -c 'import os, sysconfig
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc python3-dev >/dev/null
    else
        echo "install: no C compiler or Python headers (gcc, python3-dev): the engine installs as pure" \
             "Python, about 1.5x slower per state" >&2
    fi
fi
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
# (setuptools warns at every editable install that a folder named like the package may shadow it.)
PYTHONWARNINGS="ignore:Editable installation" "$venv/bin/python" -m pip install -q -e "$spec"
if [ "${AGENT_PURE_PYTHON:-0}" != 1 ] && ! "$venv/bin/python" -I -c '
import sys
from agent._compiled import COMPILED, compiled_path
sys.exit(any(compiled_path(module) is None for module in COMPILED))'; then
    echo "install: compiling the engine's modules failed (pip install -v -e . says why): it runs as pure" \
         "Python, about 1.5x slower per state" >&2
fi
# Bytecode now: users who cannot write to this checkout (agentctl, agentd's job runners)
# would otherwise compile every module of the package on every start.
"$venv/bin/python" -m compileall -q "$here/agent" >/dev/null
# agentctl as a script of our own, in place of pip's: Python started with -I -S (no site
# module, no .pth files, no PYTHON* variables), the package's directory put on sys.path by the
# script. agentctl needs only the standard library and this package, and site was about
# a tenth of each command's work.
"$venv/bin/python" -I - "$venv/bin/agentctl" <<'PY'
import os, sys
import agent
root = os.path.dirname(os.path.dirname(os.path.abspath(agent.__file__)))
text = (f"#!{sys.executable} -IS\n# agentctl, written by scripts/install.sh (-I -S: a faster start)\n"
        f"import sys\nsys.path.append({root!r})\nfrom agent.daemon.ctl import console\nconsole()\n")
with open(sys.argv[1] + ".new", "w") as f:
    f.write(text)
os.chmod(sys.argv[1] + ".new", 0o755)
os.replace(sys.argv[1] + ".new", sys.argv[1])
PY
if [ -n "$service" ]; then "$venv/bin/agentctl" install >&2; fi
echo "$venv"
