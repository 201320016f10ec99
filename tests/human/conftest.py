"""A fake clock for human-input timeouts: time moves only when a test advances it."""

from __future__ import annotations

import pytest

from agent.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
