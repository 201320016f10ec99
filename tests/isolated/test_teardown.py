"""The supervisor's teardown at exit runs with SIGINT ignored: a second Ctrl-C cannot cut it
short (it printed a traceback and left a cgroup frozen)."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import signal
from agent.supervisor.teardown import at_exit
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a CI job may ignore it)
at_exit(lambda: print("at exit:", signal.getsignal(signal.SIGINT) is signal.SIG_IGN))
print("while running:", signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
"""


def test_a_teardown_at_exit_ignores_ctrl_c():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["while running: False", "at exit: True"], done.stderr

