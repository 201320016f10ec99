#!/usr/bin/env bash
# Install the package with its test extras and run the whole test suite.
#   scripts/test.sh [pytest args...]
# As root on a cgroup v1 host it also runs the cgroup v2 suite in a guest (.ci/guest-tests).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$here/scripts/install.sh" test,monitor | tail -n 1)
cd "$here"
status=0
"$venv/bin/python" -m pytest "$@" || status=$?
if [ -x .ci/guest-tests ] && [ "${AGENT_SKIP_GUEST:-0}" != 1 ]; then
    .ci/guest-tests "$venv/bin/python" || status=$?
fi
exit $status
