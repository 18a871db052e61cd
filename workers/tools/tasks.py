"""The tool pool: runs one tool call per message, off the model workers, under time and memory limits.

Each call runs under Celery's soft and hard time limits (UMIQ_TOOL_TIMEOUT_S) in a pool process whose address space
is capped (UMIQ_TOOL_MEMORY_MB, set when the process starts): a tool that hangs or allocates too much ends as an
error observation the model sees, never as a stuck or OOM-killed worker.

At start the pool publishes the tool sets it can run into the store's catalogue, which is how the API and the
orchestrator learn tool names and docs without importing tool code.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import socket
import time
from typing import Any

import sqlalchemy as sa
import structlog
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from sqlmodel import select

from orchestrator.logs import bind_step
from orchestrator.queues import EXECUTE_TOOL, STEP_RESULT, app, send
from orchestrator.settings import Settings, get_settings
from orchestrator.store import ToolCatalog, session_scope, utcnow
from workers.tools.registry import execute, get_toolset, known_toolsets

__all__ = ["load_tool_modules", "publish_catalog", "limit_memory", "execute_tool"]

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


def _address_space() -> int:
    """This process's virtual size in bytes (Linux); 0 where /proc is missing, making the cap an absolute size."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@worker_process_init.connect
def limit_memory(**_: Any) -> None:
    """Cap a pool process's address space (RLIMIT_AS) at its size at start plus UMIQ_TOOL_MEMORY_MB.

    Relative to the start size because a forked process already maps the parent's imports and thread stacks, which
    differ per deployment; one call runs at a time per process, so the headroom is what one call may use.
    """
    limit = _address_space() + _settings.tool_memory_mb * 2**20
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError) as exc:  # a platform without an address-space limit (macOS) still runs tools
        log.warning("tools.memory_limit_unavailable", error=repr(exc))
        return
    log.info("tools.memory_limited", limit_mb=limit // 2**20, tool_memory_mb=_settings.tool_memory_mb)


def _limit_error(tool: str, error: str | None) -> str | None:
    """A clear message for a call stopped by a limit; the registry reports any tool exception as ``Type: message``."""
    kind = (error or "").split(":", 1)[0]
    if kind == SoftTimeLimitExceeded.__name__:
        return f"tool {tool!r} timed out after {_settings.tool_timeout_s:g} s"
    if kind == MemoryError.__name__:
        return f"tool {tool!r} ran out of memory (limit {_settings.tool_memory_mb} MB)"
    return None


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
        except (SoftTimeLimitExceeded, MemoryError) as exc:  # outside the tool itself: state replay, rendering
            content, error = "", f"{type(exc).__name__}: {exc}"
        limited = _limit_error(tool, error)
        if limited is not None:
            content, error = json.dumps({"error": limited}), limited
        latency_ms = (time.perf_counter() - started) * 1000
        result = {"observation": content, "error": error, "latency_ms": latency_ms, "worker": f"tools@{socket.gethostname()}"}
        send(STEP_RESULT, {"step_id": step_id, "result": result})
        # Logged once the observation is on its way: the orchestrator need not wait for the line to be rendered.
        log.info("tool.executed", tool=tool, error=error, latency_ms=round(latency_ms, 1))
