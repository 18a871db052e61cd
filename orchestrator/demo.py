"""``umiq demo``: start every pool as a process, run a few BFCL tasks through them, print trajectories and a summary.

Part of the CLI layer (it starts workers and uses BFCL's checker), so it may import worker code. The same Celery
code path serves the demo and production; only the URLs differ (SQLite + filesystem broker when none are set).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from sqlmodel import select

from orchestrator.client import Client
from orchestrator.schemas import TaskOptions, TaskSpec, TaskView
from orchestrator.settings import Settings
from orchestrator.showing import print_summary, print_task
from orchestrator.store import Task, ToolCall, ToolCatalog, Trajectory, get_engine, migrate, session_scope

__all__ = ["bfcl_task", "pick_entries", "judge", "pools", "run_demo"]

POOL_NAMES = ("tools", "orchestrator", "planner", "caller", "summarizer")


def _entry(entry_id: str) -> dict[str, Any]:
    from workers.tools import bfcl

    category = entry_id.rsplit("_", 1)[0]
    for entry in bfcl.load_entries(category):
        if entry["id"] == entry_id:
            return entry
    raise KeyError(f"no BFCL entry {entry_id!r} in {category}")


def bfcl_task(entry_id: str, *, n_turns: int | None = None, steps_per_turn: int | None = None) -> TaskSpec:
    """A BFCL multi-turn entry as a umiq task, optionally cut to its first ``n_turns`` turns."""
    from workers.tools import bfcl

    task = bfcl.entry_task(_entry(entry_id))
    return TaskSpec(
        turns=task["turns"][:n_turns],
        tools=task["toolsets"],
        initial_config=task["initial_config"],
        options=TaskOptions(max_steps_per_turn=steps_per_turn),
        meta={"bfcl_id": task["bfcl_id"], "category": task["category"]},
    )


def pick_entries(n: int) -> list[str]:
    """The cheapest entries to run on a CPU: one tool class with short docs, few ground-truth calls in turn one."""
    from workers.tools import bfcl
    from workers.tools.registry import get_toolset

    def cost(entry: dict[str, Any]) -> tuple[int, int, int]:
        classes = entry["involved_classes"]
        doc_chars = sum(len(str(spec)) for name in classes for spec in get_toolset(name).specs())
        return len(classes), doc_chars, len(entry["ground_truth"][0])

    entries = sorted(bfcl.load_entries("multi_turn_base"), key=cost)
    return [entry["id"] for entry in entries[:n]]


def judge(engine: sa.Engine, task_id: str) -> dict[str, Any] | None:
    """Run BFCL's own multi-turn checker on the calls the trajectory made, and store its verdict."""
    from workers.tools import bfcl

    with session_scope(engine) as session:
        task = session.get(Task, task_id)
        entry_id = (task.meta or {}).get("bfcl_id") if task else None
        if not entry_id:
            return None
        trajectory = session.exec(select(Trajectory).where(Trajectory.task_id == task_id)).one()
        calls = session.exec(
            select(ToolCall).where(ToolCall.trajectory_id == trajectory.id, ToolCall.hallucinated == False).order_by(ToolCall.id)  # noqa: E712
        ).all()
        per_turn: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for call in calls:
            per_turn[call.turn].append((call.tool, call.arguments))
        entry = _entry(entry_id)
        n = len(task.turns)
        cut = {**entry, "question": entry["question"][:n], "ground_truth": entry["ground_truth"][:n]}
        verdict = bfcl.check_entry(cut, [per_turn[t] for t in range(n)])
        trajectory.verdict = {"valid": bool(verdict["valid"]), "error_type": verdict.get("error_type")}
        session.add(trajectory)
        return trajectory.verdict


@contextmanager
def pools(settings: Settings, log_dir: Path, max_new_tokens: int) -> Iterator[list[subprocess.Popen]]:
    """Start one process per pool (their logs go to files) and stop them all on exit.

    Unless the user set them, the role pools generate at most ``max_new_tokens`` per step: on a CPU every token
    counts, and an untrained backbone rambles.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "UMIQ_HOME": str(settings.home)}
    for role in ("PLANNER", "CALLER", "SUMMARIZER"):
        env.setdefault(f"UMIQ_{role}__MAX_NEW_TOKENS", str(max_new_tokens))
    procs = []
    for name in POOL_NAMES:
        log = (log_dir / f"{name}.log").open("w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "worker", name, "--concurrency", "2"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
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


def _wait_for_catalog(engine: sa.Engine, names: list[str], procs: list[subprocess.Popen], timeout: float) -> None:
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
        _wait_for_catalog(engine, sorted({t for s in specs for t in s.tools}), procs, timeout=180)
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
