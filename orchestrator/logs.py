"""Structured logging: JSON lines in production (UMIQ_LOG_FORMAT=json), readable console output locally.

Step context (trajectory id, turn, step, role) is bound once with :func:`bind_step`; every event logged while it
is bound carries it.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from orchestrator.settings import Settings, get_settings

__all__ = ["setup_logging", "bind_step", "redact"]

_SECRET_KEYS = {"api_key", "authorization", "x-api-key", "password", "token"}


def redact(_logger: object, _name: str, event: dict) -> dict:
    """Never let a secret reach a log line, whatever a caller passed."""
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
    return event


def setup_logging(settings: Settings | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and route the standard library's logging (celery, uvicorn) through the same renderer."""
    settings = settings or get_settings()
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))


@contextmanager
def bind_step(trajectory_id: str, turn: int, step: int, role: str) -> Iterator[None]:
    """Bind the step's identity for the duration of its handling."""
    with structlog.contextvars.bound_contextvars(trajectory_id=trajectory_id, turn=turn, step=step, role=role):
        yield
