#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install the package into it.
#   scripts/install.sh [extras]      e.g. scripts/install.sh test,monitor
#   scripts/install.sh --service     also install agentd as a systemd service and start it
# The venv is built from Debian's /usr/bin/python3 when present, in a world-readable
# place when run as root ($AGENT_VENV, default /opt/agent-venv), so that sandboxed states
# running under their own uid can execute the interpreter. Prints the venv path last.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
service=
if [ "${1:-}" = "--service" ]; then service=1; shift; fi
extras=${1:-}
if [ "$(id -u)" = 0 ]; then venv=${AGENT_VENV:-/opt/agent-venv}; else venv=${AGENT_VENV:-$here/.venv}; fi
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
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
chmod 755 "$venv" 2>/dev/null || true
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
"$venv/bin/python" -m pip install -q -e "$spec"
if [ -n "$service" ]; then "$venv/bin/agentctl" install >&2; fi
echo "$venv"
