"""umiq's own traffic as training data: finished trajectories read back from the store (Postgres is the truth).

Each stored ``message`` row is one α-UMi conversation entry, in ``seq`` order, so a stored trajectory maps 1:1 onto
a :class:`training.samples.Trajectory`: tools from ``trajectory.tool_specs`` (the specs its prompts were rendered
with), hallucinated calls from ``toolcall.hallucinated`` (their caller message is marked, so those steps never
become planner, caller or backbone targets while the rest of the trajectory still trains), outcome, verdict and
score in ``meta``. ``task_id`` is the task's BFCL id where it has one (``task.meta["bfcl_id"]``), so the split
guard (:mod:`training.split`) sees BFCL traffic under the same ids as seed data; otherwise the task's own id.

Feedback: scores are passed in as ``feedback`` (trajectory id -> mean score), so this module does not depend on
how they are stored; with a ``Feedback`` table (trajectory_id, score, comment, created_at) the caller builds it as
``dict(session.exec(select(Feedback.trajectory_id, func.avg(Feedback.score)).group_by(Feedback.trajectory_id)))``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Session, select

from orchestrator import store
from orchestrator.protocol import Message, Speaker, ToolSpec
from training.samples import Trajectory

__all__ = ["SOURCE", "GAVE_UP", "trajectories_from_store"]

SOURCE = "store"
"""``Trajectory.source`` of trajectories read from the store."""

GAVE_UP = "gave_up"
"""The turn outcome the state machine records for a planner's give-up."""

_CHUNK = 1000
"""Trajectory ids per ``IN`` query, well below any driver's bound on bound parameters."""


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def _keep(
    trajectory: store.Trajectory,
    *,
    only_valid: bool,
    min_score: float | None,
    give_ups: str,
    feedback: Mapping[str, float] | None,
) -> bool:
    if only_valid and not (trajectory.verdict or {}).get("valid"):
        return False
    if min_score is not None and (feedback or {}).get(trajectory.id, float("-inf")) < min_score:
        return False
    return give_ups == "negative" or all(o.get("outcome") != GAVE_UP for o in trajectory.outcomes)


def _messages(session: Session, ids: Sequence[str]) -> dict[str, list[store.Message]]:
    rows: dict[str, list[store.Message]] = defaultdict(list)
    for chunk in _chunks(ids):
        query = select(store.Message).where(store.Message.trajectory_id.in_(chunk)).order_by(store.Message.seq)
        for row in session.exec(query):
            rows[row.trajectory_id].append(row)
    return rows


def _hallucinated_steps(session: Session, ids: Sequence[str]) -> set[int]:
    """Caller step ids whose call named no tool of the trajectory (their caller message carries the step id)."""
    steps: set[int] = set()
    for chunk in _chunks(ids):
        query = select(store.ToolCall.caller_step_id).where(
            store.ToolCall.trajectory_id.in_(chunk), store.ToolCall.hallucinated == sa.true()
        )
        steps.update(session.exec(query))
    return steps


def _trajectory(
    row: store.Trajectory,
    task: store.Task,
    messages: Sequence[store.Message],
    hallucinated: set[int],
    score: float | None,
) -> Trajectory:
    marked = frozenset(i for i, m in enumerate(messages) if m.speaker == Speaker.CALLER and m.step_id in hallucinated)
    meta: dict[str, Any] = {
        "trajectory_id": row.id,
        "task": task.id,
        "status": row.status,
        "outcomes": row.outcomes,
        "verdict": row.verdict,
        "score": score,
        "category": (task.meta or {}).get("category"),
        "finished_at": row.finished_at,
    }
    return Trajectory(
        tools=[ToolSpec.from_dict(spec) for spec in row.tool_specs],
        messages=[Message(Speaker(m.speaker), m.content) for m in messages],
        task_id=(task.meta or {}).get("bfcl_id") or task.id,
        source=SOURCE,
        hallucinated=marked,
        meta=meta,
    )


def trajectories_from_store(
    engine: sa.Engine,
    *,
    only_valid: bool = False,
    min_score: float | None = None,
    give_ups: Literal["exclude", "negative"] = "exclude",
    since: datetime | None = None,
    feedback: Mapping[str, float] | None = None,
) -> list[Trajectory]:
    """Finished trajectories (completed or failed, never running), oldest first, filtered for training.

    ``only_valid``: only those BFCL's checker judged valid (``trajectory.verdict["valid"]``); unjudged ones are left
    out. ``min_score``: only those whose mean feedback score in ``feedback`` is at least this (no score, no entry).
    ``give_ups``: ``"exclude"`` leaves out every trajectory with a given-up turn; ``"negative"`` keeps them, and
    their give-up steps become ``Next: give up.`` planner and ``conclusion: give up.`` backbone targets, as the
    reference trains give-ups from ToolBench's failed search branches. ``since``: finished at or after this time.
    """
    if min_score is not None and feedback is None:
        raise ValueError("min_score filters on feedback scores: pass feedback (trajectory id -> mean score)")
    if give_ups not in ("exclude", "negative"):
        raise ValueError(f"give_ups must be 'exclude' or 'negative', not {give_ups!r}")
    query = (
        select(store.Trajectory, store.Task)
        .join(store.Task, store.Trajectory.task_id == store.Task.id)
        .where(store.Trajectory.status != store.TrajectoryStatus.RUNNING)
    )
    if since is not None:
        query = query.where(store.Trajectory.finished_at >= since)
    with store.session_scope(engine) as session:
        rows = [
            (trajectory, task)
            for trajectory, task in session.exec(query.order_by(store.Trajectory.finished_at, store.Trajectory.id))
            if _keep(trajectory, only_valid=only_valid, min_score=min_score, give_ups=give_ups, feedback=feedback)
        ]
        ids = [trajectory.id for trajectory, _ in rows]
        messages = _messages(session, ids)
        hallucinated = _hallucinated_steps(session, ids)
    scores = feedback or {}
    return [_trajectory(t, task, messages[t.id], hallucinated, scores.get(t.id)) for t, task in rows]
