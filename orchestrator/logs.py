"""Structured logging: JSON lines in production (UMIQ_LOG_FORMAT=json), readable console output locally.

Step context (trajectory id, turn, step, role) is bound once with :func:`bind_step`; every event logged while it
is bound carries it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

from orchestrator.auth import TOKEN_PREFIX
from orchestrator.settings import Settings, get_settings

__all__ = ["setup_logging", "bind_step", "redact"]

_SECRET_KEYS = {"api_key", "authorization", "x-api-key", "x_api_key", "password", "token", "cookie", "secret"}
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s,;'\"]+")
_API_KEY = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{16,}")
"""A whole API key; its display prefix (``umiq_`` and 8 characters) is shorter, so ``umiq keys list`` output stays."""


def _is_secret(key: object) -> bool:
    name = key.decode("latin-1") if isinstance(key, bytes) else key
    return isinstance(name, str) and name.lower() in _SECRET_KEYS


def _scrub(value: Any) -> Any:
    """Secret-named fields and bearer tokens or API keys inside text, at any depth of dicts, lists and tuples."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        return _API_KEY.sub(TOKEN_PREFIX + "***", _BEARER.sub(r"\1***", value))
    if isinstance(value, Mapping):
        return {k: "***" if _is_secret(k) else _scrub(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        pairs = [("***" if i == 1 and _is_secret(value[0]) else _scrub(v)) for i, v in enumerate(value)]
        return pairs if isinstance(value, list) else tuple(pairs)
    return value


def redact(_logger: object, _name: str, event: dict) -> dict:
    """Never let a secret reach a log line, whatever a caller passed: a header dict, a raw ASGI header list, a message."""
    for key in list(event):
        event[key] = "***" if _is_secret(key) else _scrub(event[key])
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
