#!/usr/bin/env bash
# Install the package with its test extras and run the whole test suite, on this checkout.
#   scripts/test.sh [pytest args...]
# What it installs: the package (editable) with extras test, monitor, gpu, ray and dev (the
# linters) into the venv of scripts/install.sh ($AGENT_VENV, default <checkout>/.venv).
# Before the tests it checks the style (ruff, pyproject's [tool.ruff]), the layers
# (import-linter, pyproject's [tool.importlinter]) and that the public API type-checks
# under mypy --strict (pyproject's [tool.mypy]). As root on a cgroup v1 host it also runs the cgroup v2 suite in a guest (.ci/guest-tests: qemu, busybox and
# kmod from apt, Debian's kernel package unpacked into .ci-out/kernel, never installed,
# and virtme-ng into .ci-out/vng); AGENT_SKIP_GUEST=1 skips it.
# It tests the checkout where it is and writes only to the venv, .ci-out/ and temporary
# directories it removes.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

# Sandboxed states run under uids of their own; modules they import after the switch must
# be readable by those uids: every directory above the code searchable, the code readable.
readable_by_others() {
    python3 - "$1" <<'PY'
import os, stat, sys
path = os.path.abspath(sys.argv[1])
directory = os.path.dirname(path)
while True:
    if not os.stat(directory).st_mode & stat.S_IXOTH:
        sys.exit(1)
    if directory == os.sep:
        break
    directory = os.path.dirname(directory)
sys.exit(0 if os.stat(path).st_mode & stat.S_IROTH else 1)
PY
}
if [ "$(id -u)" = 0 ] && ! readable_by_others "$here/agent/__init__.py"; then
    echo "test: note: $here is not readable by other users; sandbox tests that import code after" \
         "the uid switch will fail: put the checkout somewhere others can read (e.g. /srv, /opt)" >&2
fi
venv=$("$here/scripts/install.sh" test,monitor,gpu,ray,dev | tail -n 1)
cd "$here"
status=0
"$venv/bin/ruff" check --quiet . || status=1
"$venv/bin/lint-imports" --no-cache >/dev/null || { "$venv/bin/lint-imports" --no-cache; status=1; }
"$venv/bin/mypy" || status=$?
"$venv/bin/python" -m pytest "$@" || status=$?
if [ "${AGENT_SKIP_GUEST:-0}" = 1 ]; then
    :
elif [ "$(id -u)" = 0 ] && [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then
    .ci/guest-tests "$venv/bin/python" || status=$?
else
    echo "test: the cgroup v2 guest suite runs only as root on a cgroup v1 host; skipped" >&2
fi
exit $status
