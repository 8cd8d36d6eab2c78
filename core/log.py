"""structlog set-up: key-value events, JSON when stderr is not a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"trace": 5, "debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40,
           "fatal": 50, "panic": 50}


def setup(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog once per process."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level.lower(), 20)),
        # One write() per event (PrintLogger's print() makes two: the line, then "\n").
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(_LEVELS.get(level.lower(), 20), logging.WARNING), stream=stream)


def get(name: str, **bound: Any) -> Any:
    """A logger bound to ``name`` (and any keys, e.g. namespace and id)."""
    return structlog.get_logger(name).bind(**bound)
