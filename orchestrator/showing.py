"""Rich rendering of trajectories for people: ``umiq show`` and the demo print through here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.schemas import StepView, TaskView

__all__ = ["print_task", "role_stats", "served_versions", "print_summary"]

_COLORS = {"planner": "cyan", "caller": "magenta", "tools": "yellow", "summarizer": "green"}


def _clip(text: str | None, limit: int = 400) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[:limit] + " …"


def _step_line(step: StepView) -> Text:
    color = _COLORS.get(step.kind, "white")
    line = Text(f"  [{step.seq:>2}] ", style="dim")
    line.append(f"{step.kind:<10}", style=f"bold {color}")
    ms = f"{step.latency_ms:8.0f} ms" if step.latency_ms is not None else "        – ms"
    tokens = f"in {step.tokens_in or 0:>5} out {step.tokens_out or 0:>4}" if step.kind != "tools" else " " * 18
    line.append(f"{ms}  {tokens}  ", style="dim")
    if step.status == "dead":
        line.append(f"[DEAD after {step.attempt + 1} attempts] ", style="bold white on red")
    if step.parse_error:
        line.append(f"[parse error: {step.parse_error}] ", style="bold red")
    if step.error:
        line.append(f"[error: {_clip(step.error, 120)}] ", style="red")
    line.append(_clip(step.raw_text).replace("\n", " ⏎ "))
    return line


def print_task(console: Console, view: TaskView) -> None:
    """The trajectory turn by turn: each user turn, then every step with its timing, tokens and output."""
    status_style = {"completed": "green", "failed": "red"}.get(view.status, "yellow")
    console.rule(f"task {view.id}  [{status_style}]{view.status}[/{status_style}]  tools: {', '.join(view.tools) or '-'}")
    for step in view.dead_letters:
        where = f"step {step.seq} ({step.kind}, turn {step.turn})"
        console.print(Text(f"dead letter: {where} after {step.attempt + 1} attempts: {_clip(step.error, 300)}", style="bold red"))
    for turn, text in enumerate(view.turns):
        console.print(Text(f"turn {turn} · user: ", style="bold") + Text(_clip(text, 600)))
        for step in (s for s in view.steps if s.turn == turn):
            console.print(_step_line(step))
        outcome = next((o for o in view.outcomes if o["turn"] == turn), None)
        if outcome:
            console.print(Text(f"  → {outcome['outcome']}", style="bold"), Text(_clip(outcome.get("answer"), 300)))
    if view.failure:
        console.print(Text(f"failure: {view.failure}", style="red"))
    if view.verdict is not None:
        ok = view.verdict.get("valid")
        console.print(Text(f"BFCL checker: {'valid' if ok else 'invalid'} {view.verdict.get('error_type') or ''}", style="green" if ok else "red"))


def role_stats(views: Sequence[TaskView]) -> dict[str, dict[str, float]]:
    """Steps, tokens and mean latency per role over finished steps."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: {"steps": 0, "tokens_in": 0, "tokens_out": 0, "ms": 0.0})
    for view in views:
        for step in view.steps:
            if step.latency_ms is None:
                continue
            row = acc[step.kind]
            row["steps"] += 1
            row["tokens_in"] += step.tokens_in or 0
            row["tokens_out"] += step.tokens_out or 0
            row["ms"] += step.latency_ms
    return {kind: {**row, "mean_ms": row["ms"] / row["steps"]} for kind, row in acc.items() if row["steps"]}


def served_versions(views: Sequence[TaskView]) -> dict[str, str]:
    """The model versions that wrote each role's steps: after a promotion, the proof of which model served."""
    found: dict[str, set[str]] = defaultdict(set)
    for view in views:
        for step in view.steps:
            if step.model_version:
                found[step.kind].add(step.model_version)
    return {kind: ", ".join(sorted(names)) for kind, names in found.items()}


def print_summary(console: Console, views: Sequence[TaskView], wall_s: float) -> None:
    """Per-task outcome and verdict, then per-role steps, tokens and latency."""
    tasks = Table(title="tasks")
    for column in ("task", "entry", "status", "steps", "tokens in/out", "BFCL checker"):
        tasks.add_column(column)
    for view in views:
        verdict = "-" if view.verdict is None else ("valid" if view.verdict.get("valid") else f"invalid: {view.verdict.get('error_type')}")
        tokens = f"{sum(s.tokens_in or 0 for s in view.steps)}/{sum(s.tokens_out or 0 for s in view.steps)}"
        tasks.add_row(view.id[:8], str(view.meta.get("bfcl_id", "-")), view.status, str(len(view.steps)), tokens, verdict)
    console.print(tasks)
    roles = Table(title=f"per role (wall time {wall_s:.1f} s)")
    for column in ("role", "model version", "steps", "tokens in", "tokens out", "mean latency ms", "total s"):
        roles.add_column(column)
    versions = served_versions(views)
    for kind, row in sorted(role_stats(views).items()):
        roles.add_row(
            kind, versions.get(kind, "-"), f"{row['steps']:.0f}", f"{row['tokens_in']:.0f}", f"{row['tokens_out']:.0f}",
            f"{row['mean_ms']:.0f}", f"{row['ms'] / 1000:.1f}",
        )
    console.print(roles)
