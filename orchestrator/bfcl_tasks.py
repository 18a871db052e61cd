"""BFCL multi-turn entries as umiq tasks, and BFCL's own checker as the judge of the trajectories that ran them.

Shared by ``umiq demo``, ``umiq submit --bfcl``, ``umiq eval bfcl`` and the benchmarks, so that every one of them
runs an entry the same way (tool sets, initial state, tools withheld until a later turn) and judges it the same way.
Part of the CLI layer, like the demo: it reads BFCL's data and runs its checker, so it may import worker code.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlmodel import select

from orchestrator.schemas import MAX_STEPS, TaskOptions, TaskSpec
from orchestrator.store import Task, ToolCall, Trajectory, session_scope
from workers.tools import bfcl
from workers.tools.registry import get_toolset

__all__ = ["bfcl_task", "category_of", "entry", "judge", "pick_entries"]

def category_of(entry_id: str) -> str:
    """``multi_turn_miss_func_12`` -> ``multi_turn_miss_func``."""
    return entry_id.rsplit("_", 1)[0]


@cache
def _entries(category: str) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in bfcl.load_entries(category)}


def entry(entry_id: str) -> dict[str, Any]:
    """One BFCL entry (any multi-turn category) with its ground truth; read once per process, never modify it."""
    try:
        return _entries(category_of(entry_id))[entry_id]
    except (KeyError, ValueError):
        raise KeyError(f"no BFCL multi-turn entry {entry_id!r}") from None


def bfcl_task(entry_id: str, *, n_turns: int | None = None, steps_per_turn: int | None = None) -> TaskSpec:
    """A BFCL multi-turn entry as a umiq task, optionally cut to its first ``n_turns`` turns.

    The miss-function category's functions are withheld until the turn that adds them, as BFCL's inference does.
    With ``steps_per_turn`` the trajectory's budget covers every turn at that rate, so the per-turn budget is the
    one that binds (the server's trajectory budget would otherwise end long entries early).
    """
    task = bfcl.entry_task(entry(entry_id))
    turns = task["turns"][:n_turns]
    withheld = {name: turn for turn, names in task["missed_function"].items() for name in names}
    max_steps = min(steps_per_turn * len(turns), MAX_STEPS) if steps_per_turn else None
    return TaskSpec(
        turns=turns,
        tools=task["toolsets"],
        initial_config=task["initial_config"],
        options=TaskOptions(max_steps_per_turn=steps_per_turn, max_steps=max_steps, tools_withheld_until=withheld),
        meta={"bfcl_id": task["bfcl_id"], "category": task["category"]},
    )


def pick_entries(n: int) -> list[str]:
    """The cheapest entries to run on a CPU: one tool class with short docs, few ground-truth calls in turn one."""

    def cost(item: dict[str, Any]) -> tuple[int, int, int]:
        classes = item["involved_classes"]
        doc_chars = sum(len(str(spec)) for name in classes for spec in get_toolset(name).specs())
        return len(classes), doc_chars, len(item["ground_truth"][0])

    entries = sorted(_entries("multi_turn_base").values(), key=cost)
    return [item["id"] for item in entries[:n]]


def judge(engine: sa.Engine, task_id: str) -> dict[str, Any]:
    """Run BFCL's own multi-turn checker on the calls the trajectory made, and store its verdict with it.

    Hallucinated calls (no such tool, or one still withheld) ran nothing, so the checker never sees them. The entry
    is cut to the task's turns, so a task cut short (the demo's first turn) is judged on what it was asked.
    """
    with session_scope(engine) as session:
        task = session.get(Task, task_id)
        entry_id = (task.meta or {}).get("bfcl_id") if task else None
        if not entry_id:
            raise ValueError(f"task {task_id} is not a BFCL entry (no meta.bfcl_id)")
        trajectory = session.exec(select(Trajectory).where(Trajectory.task_id == task_id)).one()
        calls = session.exec(
            select(ToolCall).where(ToolCall.trajectory_id == trajectory.id, ToolCall.hallucinated == False).order_by(ToolCall.id)
        ).all()
        per_turn: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for call in calls:
            per_turn[call.turn].append((call.tool, call.arguments))
        item = entry(entry_id)
        n = len(task.turns)
        cut = {**item, "question": item["question"][:n], "ground_truth": item["ground_truth"][:n]}
        verdict = bfcl.check_entry(cut, [per_turn[t] for t in range(n)])
        trajectory.verdict = {"valid": bool(verdict["valid"]), "error_type": verdict.get("error_type")}
        session.add(trajectory)
        return trajectory.verdict
