"""Celery tasks of the ``orchestrator`` queue: apply a pool's step result, sweep for lost messages.

A database outage makes these tasks retry with exponential backoff instead of losing the result: the message
stays unacknowledged (late acks) until the store has it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy.exc
from celery import Task

from orchestrator import engine as engine_ops
from orchestrator.queues import STEP_RESULT, SWEEP, app
from orchestrator.settings import get_settings
from orchestrator.store import get_engine

__all__ = ["step_result", "sweep"]

_DB_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
_RETRY = {"autoretry_for": _DB_ERRORS, "retry_backoff": 1, "retry_backoff_max": 30, "max_retries": 40, "retry_jitter": True}


@app.task(name=STEP_RESULT, bind=True, **_RETRY)
def step_result(self: Task, step_id: int, result: dict[str, Any]) -> None:
    """A role or tool pool finished a step: store it and advance the trajectory."""
    settings = get_settings()
    engine_ops.handle_result(get_engine(settings.resolved_database_url), step_id, result, settings)


@app.task(name=SWEEP, bind=True, **_RETRY)
def sweep(self: Task) -> int:
    """Re-send queued steps whose messages were lost (a broker restarted without persistence)."""
    settings = get_settings()
    return engine_ops.sweep(get_engine(settings.resolved_database_url), settings)
