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
])
def test_a_run_under_a_bad_setting_is_refused_before_anything_runs(
    isolation: str, name: str, value: str, wanted: str,
) -> None:
    """Refused as run() starts, before any state (it was the first state's failed attempt,
    a failure of the workflow's that is the machine's setting)."""
    script = textwrap.dedent(f"""
        from agent import Agent, InvalidConfigurationError, RetryPolicy
        async def s(context):
            return None
        agent = Agent("bad_setting", isolation={isolation!r}, retry_policy=RetryPolicy(max_retries=3, initial_delay=0))
        agent.add_state("s", s)
        try:
            agent.run_sync()
        except InvalidConfigurationError as exc:
            print(agent.status.value, agent.state_metadata["s"].status.value, agent.state_metadata["s"].attempts)
            print(exc)
    """)
    env = {**os.environ, name: value, "AGENT_STATUS_ENDPOINT": "off"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["idle pending 0", f"{name}={value!r}: give a {wanted}"], out.stderr
