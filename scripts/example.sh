#!/usr/bin/env bash
# Install the package and run the main example workflow through the `agent` CLI.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$here/scripts/install.sh" | tail -n 1)
exec "$venv/bin/agent" run "$here/examples/${1:-data_analysis}.py"
