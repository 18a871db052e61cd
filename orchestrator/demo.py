"""``umiq demo``: start every pool as a process, run a few BFCL tasks through them, print trajectories and a summary.

Part of the CLI layer (it starts workers and uses BFCL's checker), so it may import worker code. The same Celery
code path serves the demo and production; only the URLs differ (SQLite + filesystem broker when none are set).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from sqlmodel import select

from orchestrator.bfcl_tasks import bfcl_task, judge, pick_entries
from orchestrator.client import Client
from orchestrator.schemas import TaskView
from orchestrator.settings import Settings
from orchestrator.showing import print_summary, print_task
from orchestrator.store import ToolCatalog, get_engine, migrate, session_scope

__all__ = ["POOL_NAMES", "pools", "run_demo", "wait_for_catalog"]

POOL_NAMES = ("tools", "orchestrator", "planner", "caller", "summarizer")


@contextmanager
def pools(
    settings: Settings, log_dir: Path, max_new_tokens: int, env: Mapping[str, str] | None = None
) -> Iterator[list[subprocess.Popen]]:
    """Start one process per pool (their logs go to files) and stop them all on exit.

    Unless the user set them, the role pools generate at most ``max_new_tokens`` per step: on a CPU every token
    counts, and an untrained backbone rambles. ``env`` overrides the pools' environment on top of this process's,
    e.g. ``UMIQ_PLANNER__MODEL`` to serve a given model in one role.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "UMIQ_HOME": str(settings.home)}
    for role in ("PLANNER", "CALLER", "SUMMARIZER"):
        environment.setdefault(f"UMIQ_{role}__MAX_NEW_TOKENS", str(max_new_tokens))
    environment.update(env or {})
    procs = []
    for name in POOL_NAMES:
        log = (log_dir / f"{name}.log").open("w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "worker", name, "--concurrency", "2"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        )
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for_catalog(engine: sa.Engine, names: list[str], procs: list[subprocess.Popen], timeout: float) -> None:
    """Block until the tools pool has published ``names``; a pool that died at start fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [POOL_NAMES[i] for i, p in enumerate(procs) if p.poll() is not None]
        if dead:
            raise RuntimeError(f"worker pool(s) exited at start: {', '.join(dead)}; see their logs")
        with session_scope(engine) as session:
            if set(names) <= set(session.exec(select(ToolCatalog.name)).all()):
                return
        time.sleep(0.5)
    raise TimeoutError("the tools pool did not publish its catalogue in time")


def run_demo(
    settings: Settings,
    console: Console,
    *,
    n_tasks: int,
    n_turns: int,
    steps_per_turn: int,
    max_new_tokens: int,
    timeout: float,
) -> int:
    """Returns the process exit code: 0 when every task reached a final state, 1 otherwise."""
    migrate(settings.resolved_database_url)
    engine = get_engine(settings.resolved_database_url)
    specs = [bfcl_task(entry_id, n_turns=n_turns, steps_per_turn=steps_per_turn) for entry_id in pick_entries(n_tasks)]
    broker = settings.broker_url or "embedded filesystem"
    console.print(f"[bold]umiq demo[/bold]: {len(specs)} BFCL tasks, database {settings.resolved_database_url}, broker {broker}")
    console.print(f"worker logs: {settings.home / 'logs'}; the first run converts SmolLM2 once (about 30 s)")
    client = Client(settings)
    with pools(settings, settings.home / "logs", max_new_tokens) as procs:
        wait_for_catalog(engine, sorted({t for s in specs for t in s.tools}), procs, timeout=180)
        started = time.monotonic()
        ids = [client.submit(spec) for spec in specs]
        views: list[TaskView] = []
        for task_id in ids:
            remaining = max(1.0, timeout - (time.monotonic() - started))
            try:
                client.wait(task_id, timeout=remaining)
            except TimeoutError:
                console.print(f"[red]task {task_id} did not finish within {timeout:.0f} s[/red]")
            judge(engine, task_id)
            views.append(client.get(task_id, detail=True))
        wall = time.monotonic() - started
    for view in views:
        print_task(console, view)
    print_summary(console, views, wall)
    return 0 if all(v.status != "running" for v in views) else 1
