"""The supervisor's settings from the environment: a bad value is refused, naming the
variable, as a run that needs it starts (nothing of it runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from agent.errors import InvalidConfigurationError
from agent.supervisor.output import default_writer
from agent.supervisor.service import SupervisorConfig
from agent.supervisor.workers import WorkerSettings


@pytest.mark.parametrize(("name", "value"), [
    ("AGENT_STOP_GRACE", "abc"), ("AGENT_STOP_GRACE", "nan"), ("AGENT_STOP_GRACE", "-1"),
    ("AGENT_PARKED_IDLE", "inf"), ("AGENT_PARKED_MAX", "two"), ("AGENT_MAX_LAUNCHING", "0"),
    ("AGENT_MAX_LAUNCHING", "x"), ("AGENT_PARKED_MAX", "\u00b2"),
])
def test_a_bad_value_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidConfigurationError, match=f"{name}={value!r}: give a "):
        SupervisorConfig()


_COUNT, _SECONDS = "whole number (1 or more)", "number of seconds (above 0)"


@pytest.mark.parametrize(("name", "value", "wanted"), [
    ("AGENT_WORKER_MAX", "0", _COUNT), ("AGENT_WORKER_MAX_STATES", "1e3", _COUNT),
    ("AGENT_WORKER_MAX_STATES", "+5", _COUNT), ("AGENT_WORKER_MAX", "1_000", _COUNT),
    ("AGENT_WORKER_IDLE", "0", _SECONDS), ("AGENT_WORKER_MAX_AGE", "inf", _SECONDS),
    ("AGENT_WORKER_IDLE", "-2", _SECONDS),
])
def test_a_bad_worker_setting_is_refused_as_the_supervisor_refuses_its_own(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, wanted: str,
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidConfigurationError, match=f"^{re.escape(f'{name}={value!r}: give a {wanted}')}$"):
        WorkerSettings()


def test_good_values_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AGENT_STOP_GRACE", " 0.25 "), ("AGENT_PARKED_IDLE", "0"), ("AGENT_MAX_LAUNCHING", "3")):
        monkeypatch.setenv(name, value)
    config = SupervisorConfig()
    assert (config.grace, config.park_idle, config.max_launching) == (0.25, 0.0, 3)
    for name, value in (("AGENT_WORKER_MAX", " 2 "), ("AGENT_WORKER_MAX_STATES", "7"), ("AGENT_WORKER_IDLE", "0.5"),
                        ("AGENT_WORKER_MAX_AGE", "30")):
        monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    assert (settings.max_workers, settings.max_states, settings.idle, settings.max_age) == (2, 7, 0.5, 30.0)


@pytest.mark.parametrize("value", ["stdrr", "yes", "file"])
def test_an_echo_target_that_is_none_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AGENT_ECHO", value)
    with pytest.raises(InvalidConfigurationError, match=f"AGENT_ECHO={value!r}: give stdout, stderr or off"):
        default_writer()
    for good in ("", "stdout", "STDERR", "off"):
        monkeypatch.setenv("AGENT_ECHO", good)
        default_writer()


@pytest.mark.parametrize(("isolation", "name", "value", "wanted"), [
    ("process", "AGENT_STOP_GRACE", "2s", "number of seconds (0 or more)"),
    ("worker", "AGENT_STOP_GRACE", "2s", "number of seconds (0 or more)"),
    ("worker", "AGENT_WORKER_IDLE", "0", "number of seconds (above 0)"),
    # The worker setting of an agent whose first isolated state is a process state.
    ("process+worker", "AGENT_WORKER_IDLE", "0", "number of seconds (above 0)"),
])
def test_a_run_under_a_bad_setting_is_refused_before_anything_runs(
    isolation: str, name: str, value: str, wanted: str,
) -> None:
    """Refused as run() starts, before any state (it was the first state's failed attempt,
    a failure of the workflow's that is the machine's setting)."""
    first, *then = isolation.split("+")
    script = textwrap.dedent(f"""
        from agent import Agent, InvalidConfigurationError, RetryPolicy
        async def s(context):
            return "w" if {bool(then)} else None
        async def w(context):
            return None
        agent = Agent("bad_setting", isolation={first!r}, retry_policy=RetryPolicy(max_retries=3, initial_delay=0))
        agent.add_state("s", s)
        for level in {then!r}:
            agent.add_state("w", w, isolation=level)
        try:
            agent.run_sync()
        except InvalidConfigurationError as exc:
            print(agent.status.value, agent.state_metadata["s"].status.value, agent.state_metadata["s"].attempts)
            print(exc)
    """)
    env = {**os.environ, name: value, "AGENT_STATUS_ENDPOINT": "off"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["idle pending 0", f"{name}={value!r}: give a {wanted}"], out.stderr


@pytest.mark.parametrize(("name", "value", "wanted"), [
    ("AGENT_LOG_MAX_AGE", "abc", "AGENT_LOG_MAX_AGE='abc': give a number with an optional unit"),
    ("AGENT_LOG_MAX_FILES", "0.5", "AGENT_LOG_MAX_FILES='0.5': give a whole number, or 0 for no limit"),
    ("AGENT_PARKED_MAX", "18446744073709551616", "AGENT_PARKED_MAX='18446744073709551616': give a whole number "
     "from 0 to 2147483647"),
])
def test_a_start_refused_for_a_setting_leaves_nothing_behind(name: str, value: str, wanted: str) -> None:
    """Each run under the bad setting is refused, naming it; none leaves the cgroups, the
    socket directory or the socket library's context of the supervisor it could not start
    (they stayed, one set per run, and the next start could hang collecting the context)."""
    script = textwrap.dedent("""
        import glob, json, os, tempfile
        from agent import Agent, InvalidConfigurationError
        async def s(context):
            return None
        seen = []
        for _ in range(3):
            agent = Agent("bad_setting", isolation="process")
            agent.add_state("s", s)
            try:
                agent.run_sync()
            except InvalidConfigurationError as exc:
                seen.append(str(exc))
        me = os.getpid()
        left = glob.glob(f"/sys/fs/cgroup/*/agent/{me}-*") + glob.glob(f"{tempfile.gettempdir()}/agent-*-{me}-*")
        print(json.dumps({"seen": seen, "left": left}))
    """)
    env = {**os.environ, name: value, "AGENT_STATUS_ENDPOINT": "off"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    seen = json.loads(out.stdout.splitlines()[-1])
    assert len(seen["seen"]) == 3 and all(message.startswith(wanted) for message in seen["seen"]), seen
    assert seen["left"] == [], seen


@pytest.mark.parametrize("value", ["0.0", "00", "0d"])
def test_zero_in_any_spelling_lifts_a_log_limit(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from agent.supervisor.logs import LogRetention

    monkeypatch.setenv("AGENT_LOG_MAX_AGE", value)
    assert LogRetention.from_env().max_age == float("inf")


def test_a_frame_cap_past_what_the_socket_library_takes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import Agent

    monkeypatch.setenv("AGENT_IPC_MAX_FRAME", str(2**63))
    with pytest.raises(InvalidConfigurationError, match=f"^AGENT_IPC_MAX_FRAME='{2**63}': give a number of bytes "
                                                        "from 1048576 to 1099511627776$"):
        Agent("huge_frames")


def test_a_supervisor_whose_zygote_cannot_start_leaves_nothing_behind() -> None:
    script = textwrap.dedent("""
        import glob, json, os, tempfile
        from agent.supervisor import service
        def cannot_start(*args, **kwargs):
            raise OSError(12, "Cannot allocate memory")
        service.ZygoteLauncher = cannot_start
        seen = []
        for _ in range(2):
            try:
                service.Supervisor()
            except OSError as exc:
                seen.append(exc.errno)
        me = os.getpid()
        left = glob.glob(f"/sys/fs/cgroup/*/agent/{me}-*") + glob.glob(f"{tempfile.gettempdir()}/agent-*-{me}-*")
        print(json.dumps({"seen": seen, "left": left}))
    """)
    env = {**os.environ, "AGENT_STATUS_ENDPOINT": "off"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout.splitlines()[-1]) == {"seen": [12, 12], "left": []}, out.stdout


@pytest.mark.parametrize("value", ["3000000", "1e308"])
def test_parked_children_may_wait_for_ever(value: str) -> None:
    """A long AGENT_PARKED_IDLE is a valid one (it crashed the zygote: its wait passed what
    poll() takes, and every state failed)."""
    script = textwrap.dedent("""
        from agent import Agent
        async def s(context):
            context.set_state("n", context.get_state("n", 0) + 1)
            return "s" if context.get_state("n") < 3 else None
        agent = Agent("parked_for_ever", isolation="process")
        agent.add_state("s", s)
        print(agent.run_sync().get_state("n"))
    """)
    env = {**os.environ, "AGENT_PARKED_IDLE": value, "AGENT_STATUS_ENDPOINT": "off", "AGENT_ECHO": "off"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "3", "")
