"""What the HTTP API and the Python client share: the views they read and the checks they make before a write.

Both surfaces go through these functions so a task looks the same, and is refused for the same reasons, whichever
one a backend service uses. Every function takes ``owner``: ``None`` sees every task (no authentication yet); a
value limits the caller to its own tasks, which is how API keys will slot in.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import aliased
from sqlmodel import Session, select
from sqlmodel.sql.expression import Select

from orchestrator.engine import NotFound
from orchestrator.schemas import MessageView, StepView, TaskView
from orchestrator.store import Message, Step, StepStatus, Task, Trajectory, TrajectoryStatus

__all__ = [
    "FINISHED_STEPS",
    "is_finished",
    "task_view",
    "list_tasks",
    "steps_since",
]

FINISHED_STEPS = (StepStatus.DONE, StepStatus.DEAD)
"""Step states that no longer change: what a stream yields."""


def is_finished(view: TaskView) -> bool:
    """A trajectory that left 'running' is finished until a new turn is appended."""
    return view.status != TrajectoryStatus.RUNNING


# ---------------------------------------------------------------------------------------------------------- reads


def _latest_trajectory_id() -> sa.ScalarSelect:
    """The newest trajectory of the enclosing query's task, the one a task's status is read from."""
    newer = aliased(Trajectory)
    return (
        sa.select(newer.id)
        .where(newer.task_id == Task.id)
        .order_by(newer.created_at.desc(), newer.id.desc())
        .limit(1)
        .correlate(Task)
        .scalar_subquery()
    )


def _tasks_with_trajectory(owner: str | None) -> Select[tuple[Task, Trajectory]]:
    query = select(Task, Trajectory).join(Trajectory, Trajectory.id == _latest_trajectory_id())
    return query if owner is None else query.where(Task.owner == owner)


def _view(task: Task, trajectory: Trajectory) -> TaskView:
    return TaskView(
        id=task.id,
        trajectory_id=trajectory.id,
        status=trajectory.status,
        turn=trajectory.turn,
        turns=task.turns,
        tools=task.toolsets,
        meta=task.meta,
        outcomes=trajectory.outcomes,
        failure=trajectory.failure,
        verdict=trajectory.verdict,
        created_at=task.created_at,
        finished_at=trajectory.finished_at,
    )


def _messages(session: Session, trajectory_id: str) -> list[MessageView]:
    rows = session.exec(select(Message).where(Message.trajectory_id == trajectory_id).order_by(Message.seq)).all()
    return [MessageView.model_validate(row, from_attributes=True) for row in rows]


def _steps(session: Session, trajectory_id: str, *, status: StepStatus | None = None) -> list[StepView]:
    query = select(Step).where(Step.trajectory_id == trajectory_id)
    if status is not None:
        query = query.where(Step.status == status)
    return [StepView.model_validate(row, from_attributes=True) for row in session.exec(query.order_by(Step.seq)).all()]


def task_view(session: Session, task_id: str, *, owner: str | None = None, detail: bool = False) -> TaskView:
    """A task's status and dead letters; ``detail`` adds its messages and every step. Another owner's task is missing."""
    row = session.exec(_tasks_with_trajectory(owner).where(Task.id == task_id)).first()
    if row is None:
        raise NotFound(task_id)
    view = _view(*row)
    view.dead_letters = _steps(session, view.trajectory_id, status=StepStatus.DEAD)
    if detail:
        view.messages = _messages(session, view.trajectory_id)
        view.steps = _steps(session, view.trajectory_id)
    return view


def list_tasks(
    session: Session, *, owner: str | None = None, status: str | None = None, limit: int = 50, offset: int = 0
) -> list[TaskView]:
    """Newest tasks first, optionally only those whose trajectory has ``status``."""
    query = _tasks_with_trajectory(owner)
    if status is not None:
        query = query.where(Trajectory.status == status)
    query = query.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit).offset(offset)
    return [_view(task, trajectory) for task, trajectory in session.exec(query).all()]


def steps_since(session: Session, trajectory_id: str, after_seq: int = -1) -> list[StepView]:
    """Finished steps after ``after_seq``, in order.

    A trajectory's next step is created only once the previous one is applied, so finished steps form a prefix of
    the sequence and a cursor on ``seq`` never skips one.
    """
    rows = session.exec(
        select(Step)
        .where(Step.trajectory_id == trajectory_id, Step.seq > after_seq, Step.status.in_(FINISHED_STEPS))
        .order_by(Step.seq)
    ).all()
    return [StepView.model_validate(row, from_attributes=True) for row in rows]
