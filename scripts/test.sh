#!/usr/bin/env bash
# Install the package with its test extras and run the whole test suite.
#   scripts/test.sh [pytest args...]
# Sandboxed states run under uids of their own, which must be able to read the code. As
# root, a checkout that other users cannot read (e.g. under /root) is copied to a
# world-readable place first ($AGENT_TEST_TREE, default /opt/agent-test-tree) and tested
# there. On a cgroup v1 host it also runs the cgroup v2 suite in a guest (.ci/guest-tests).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
world_readable() {
    python3 - "$1" <<'PY'
import os, stat, sys
path = os.path.abspath(sys.argv[1])
parts = path.split(os.sep)
for i in range(1, len(parts) + 1):
    p = os.sep.join(parts[:i]) or os.sep
    if not os.stat(p).st_mode & stat.S_IXOTH:
        sys.exit(1)
sys.exit(0 if os.stat(path).st_mode & stat.S_IROTH else 1)
PY
}
if [ "$(id -u)" = 0 ] && ! world_readable "$here/agent/__init__.py"; then
    tree=${AGENT_TEST_TREE:-/opt/agent-test-tree}
    echo "test: $here is not readable by other users; testing a copy in $tree" >&2
    rm -rf "$tree"
    mkdir -p "$tree"
    chmod 755 "$tree"
    tar -C "$here" --exclude=.git --exclude=.venv --exclude=__pycache__ -cf - . | tar -C "$tree" -xf -
    chmod -R go+rX "$tree"
    here=$tree
fi
venv=$("$here/scripts/install.sh" test,monitor,ray | tail -n 1)
cd "$here"
status=0
"$venv/bin/python" -m pytest "$@" || status=$?
if [ -x .ci/guest-tests ] && [ "${AGENT_SKIP_GUEST:-0}" != 1 ]; then
    .ci/guest-tests "$venv/bin/python" || status=$?
fi
exit $status
