"""The tool pool: runs one tool call per message, off the model workers, under a time limit (tool_timeout_s).

At start the pool publishes the tool sets it can run into the store's catalogue, which is how the API and the
orchestrator learn tool names and docs without importing tool code.
"""

from __future__ import annotations

import importlib
import json
import socket
import time
from typing import Any

import sqlalchemy as sa
import structlog
from celery.exceptions import SoftTimeLimitExceeded
from sqlmodel import select

from orchestrator.logs import bind_step
from orchestrator.queues import EXECUTE_TOOL, STEP_RESULT, app
from orchestrator.settings import Settings, get_settings
from orchestrator.store import ToolCatalog, session_scope, utcnow
from workers.tools.registry import execute, get_toolset, known_toolsets

__all__ = ["load_tool_modules", "publish_catalog", "execute_tool"]

log = structlog.get_logger(__name__)
_settings = get_settings()


def load_tool_modules(settings: Settings) -> None:
    """Import user modules whose ``@tool`` functions should be served (UMIQ_TOOL_MODULES)."""
    for name in settings.tool_modules:
        importlib.import_module(name)


def publish_catalog(engine: sa.Engine) -> list[str]:
    """Upsert every registered tool set's specs into the catalogue; returns the names published."""
    names = known_toolsets()
    with session_scope(engine) as session:
        existing = {row.name: row for row in session.exec(select(ToolCatalog))}
        for name in names:
            row = existing.get(name) or ToolCatalog(name=name)
            row.specs = [spec.to_dict() for spec in get_toolset(name).specs()]
            row.updated_at = utcnow()
            session.add(row)
    log.info("tools.catalog_published", toolsets=names)
    return names


@app.task(
    name=EXECUTE_TOOL,
    acks_late=True,
    soft_time_limit=_settings.tool_timeout_s,
    time_limit=_settings.tool_timeout_s + 10,
)
def execute_tool(
    step_id: int,
    trajectory_id: str,
    turn: int,
    seq: int,
    toolsets: list[str],
    config: dict[str, Any],
    past_calls: list[list[Any]],
    tool: str,
    arguments: dict[str, Any],
    max_chars: int,
    **_: Any,
) -> None:
    """Rebuild the trajectory's tool state, run the call, and send the observation back; errors are observations."""
    with bind_step(trajectory_id, turn, seq, "tools"):
        started = time.perf_counter()
        try:
            observation = execute(toolsets, config, [(name, args) for name, args in past_calls], tool, arguments, max_chars=max_chars)
            content, error = observation.content, observation.error
        except SoftTimeLimitExceeded:
            error = f"tool {tool!r} timed out after {_settings.tool_timeout_s:g} s"
            content = json.dumps({"error": error})
        latency_ms = (time.perf_counter() - started) * 1000
        log.info("tool.executed", tool=tool, error=error, latency_ms=round(latency_ms, 1))
        result = {"observation": content, "error": error, "latency_ms": latency_ms, "worker": f"tools@{socket.gethostname()}"}
        app.send_task(STEP_RESULT, kwargs={"step_id": step_id, "result": result})
