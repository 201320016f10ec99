"""The supervisor's own structured log (structlog): JSON when stderr is not a TTY.

A private logger pipeline, so the application's structlog configuration is left alone.
``AGENT_LOG_LEVEL`` sets the level (default ``warning``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def get_logger(name: str) -> Any:
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    level = logging.getLevelName(os.environ.get("AGENT_LOG_LEVEL", "warning").upper())
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(level if isinstance(level, int) else logging.WARNING),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        logger_name=name,
    ).bind(logger=name)
