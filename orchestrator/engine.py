"""The orchestrator's engine: store a step's result, run the state machine, and hand the next step to its pool.

Postgres is the truth and a queue message only a hint. Each result is applied in one transaction that locks the
trajectory row; a step that is no longer queued ignores further results (redelivery, a re-swept duplicate), and
the next step's message is published only after the commit. A message lost after the commit is re-sent by
:func:`sweep`.

Steps and their trajectories are read as plain records (:class:`Record`) and written back with explicit SQLAlchemy
Core statements built once at import, not through the ORM's unit of work: a result is one transaction of about
eight statements (lock and load, history, the next step, then the step's result, the new messages in one insert, the
tool call and the trajectory, those four sent together in one round trip), and the ORM's change tracking, object
construction and flush planning had cost about twice the CPU of those statements themselves. A record's attributes
are the table's columns; changing one persists nothing by itself: the function that changes it writes it
(:func:`_write_step_result`, :func:`_write_trajectory`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, TypeAlias

import sqlalchemy as sa
import structlog
from sqlmodel import Session, select

from orchestrator import machine, protocol
from orchestrator.logs import bind_step
from orchestrator.protocol import ModelRole, ToolSpec
from orchestrator.queues import EXECUTE_TOOL, app, generate_task_name, send, step_expiry_s
from orchestrator.schemas import TaskSpec
from orchestrator.settings import Settings
from orchestrator.store import (
    Feedback,
    Message,
    Step,
    StepKind,
    StepStatus,
    Task,
    ToolCall,
    ToolCatalog,
    Trajectory,
    TrajectoryStatus,
    pipelined,
    session_scope,
    utcnow,
)

__all__ = ["UnknownToolSet", "UnknownTool", "NotFound", "TooManyTurns", "add_feedback", "Outbound", "submit", "append_turn", "handle_result", "sweep", "publish"]

log = structlog.get_logger(__name__)

Executor: TypeAlias = "sa.Connection | Session"
"""Where the step functions run their statements: the hot path's Core connection, or submit's ORM session."""

_TASK, _TRAJECTORY, _STEP, _MESSAGE, _TOOLCALL = (
    Task.__table__, Trajectory.__table__, Step.__table__, Message.__table__, ToolCall.__table__  # type: ignore[attr-defined]
)


class Record(SimpleNamespace):
    """One row as a plain mutable object (attribute per loaded column), for the engine's hot path; see the module doc."""


_LOADED: dict[sa.Table, tuple[str, ...]] = {
    _STEP: ("id", "trajectory_id", "seq", "turn", "kind", "status", "attempt", "request", "error", "dispatched_at"),
    _TRAJECTORY: (
        "id", "task_id", "status", "turn", "planner_steps", "turn_planner_steps", "next_seq", "tool_specs", "outcomes",
        "failure", "updated_at", "finished_at",
    ),
    _TASK: ("id", "turns", "toolsets", "initial_config", "options"),
}
"""The columns a result needs, not whole rows: every column selected costs the driver a column description and a
conversion per row (the load had been a tenth of the handler's database CPU with all 49). A record has only these
attributes, so code reading another one fails at once rather than seeing a stale value; add it here."""

_UNSET_RESULT = dict.fromkeys(
    ("raw_text", "parsed", "parse_error", "tokens_in", "tokens_out", "latency_ms", "batch_size", "model_version", "worker", "finished_at")
)
"""What a queued step has stored of a result: nothing (a result is written only when the step stops being queued)."""


def _records(row: sa.Row[Any]) -> tuple[Record, Record, Record]:
    """Split a row of :data:`_LOAD_FOR_RESULT` into the step, trajectory and task records."""
    mapping = row._mapping
    step, trajectory, task = (Record(**{name: mapping[f"{t.name}_{name}"] for name in names}) for t, names in _LOADED.items())
    step.__dict__.update(_UNSET_RESULT)
    return step, trajectory, task


_LOAD_FOR_RESULT = (
    sa.select(*[t.c[name].label(f"{t.name}_{name}") for t, names in _LOADED.items() for name in names])
    .join_from(_STEP, _TRAJECTORY, _TRAJECTORY.c.id == _STEP.c.trajectory_id)
    .join(_TASK, _TASK.c.id == _TRAJECTORY.c.task_id)
    .where(_STEP.c.id == sa.bindparam("step_id"))
    .with_for_update(of=[_STEP, _TRAJECTORY])
)
"""One round trip loads the step, its trajectory and its task, and locks the step and the trajectory."""

_HISTORY = (
    sa.select(_MESSAGE.c.speaker, _MESSAGE.c.content)
    .where(_MESSAGE.c.trajectory_id == sa.bindparam("trajectory_id"))
    .order_by(_MESSAGE.c.seq)
)
_INSERT_MESSAGES = sa.insert(_MESSAGE).inline()
_INSERT_STEP = sa.insert(_STEP)
_REDISPATCH = (
    sa.update(_STEP)
    .where(_STEP.c.id == sa.bindparam("step_id"))
    .values(attempt=sa.bindparam("attempt"), error=sa.bindparam("error"), dispatched_at=sa.bindparam("dispatched_at"))
)
_STEP_RESULT_COLUMNS = (
    "status", "raw_text", "parsed", "parse_error", "error", "tokens_in", "tokens_out", "latency_ms", "batch_size",
    "model_version", "worker", "finished_at",
)
_WRITE_STEP_RESULT = (
    sa.update(_STEP)
    .where(_STEP.c.id == sa.bindparam("step_id"))
    .values({name: sa.bindparam(name) for name in _STEP_RESULT_COLUMNS})
)
_TRAJECTORY_STATE_COLUMNS = (
    "status", "turn", "planner_steps", "turn_planner_steps", "next_seq", "outcomes", "failure", "updated_at", "finished_at",
)
_WRITE_TRAJECTORY = (
    sa.update(_TRAJECTORY)
    .where(_TRAJECTORY.c.id == sa.bindparam("trajectory_id"))
    .values({name: sa.bindparam(name) for name in _TRAJECTORY_STATE_COLUMNS})
)
_PAST_CALLS = (
    sa.select(_TOOLCALL.c.tool, _TOOLCALL.c.arguments)
    .where(
        _TOOLCALL.c.trajectory_id == sa.bindparam("trajectory_id"),
        _TOOLCALL.c.hallucinated == sa.false(),
        _TOOLCALL.c.observation.is_not(None),
        _TOOLCALL.c.tool_step_id != sa.bindparam("step_id"),
    )
    .order_by(_TOOLCALL.c.id)
)
_TOOL_OBSERVED = (
    sa.update(_TOOLCALL)
    .where(_TOOLCALL.c.tool_step_id == sa.bindparam("step_id"))
    .values(observation=sa.bindparam("observation"), error=sa.bindparam("error"))
)
_INSERT_TOOLCALL = sa.insert(_TOOLCALL).inline()


def _write_step_result(conn: Executor, step: Record) -> None:
    """Persist what :func:`_record`, :func:`_transition` and :func:`_fail_step` set on a step record."""
    conn.execute(_WRITE_STEP_RESULT, {"step_id": step.id, **{name: getattr(step, name) for name in _STEP_RESULT_COLUMNS}})


def _write_trajectory(conn: Executor, trajectory: Record) -> None:
    """Persist a trajectory record's state (status, turn, budgets, next seq, outcomes, failure, times)."""
    conn.execute(
        _WRITE_TRAJECTORY, {"trajectory_id": trajectory.id, **{name: getattr(trajectory, name) for name in _TRAJECTORY_STATE_COLUMNS}}
    )


class UnknownToolSet(ValueError):
    """A task named a tool set no tool pool has published."""


class UnknownTool(UnknownToolSet):
    """A task withheld a tool that none of its tool sets has (so withholding it would silently do nothing)."""


class NotFound(LookupError):
    """No such task (or not visible to this owner)."""


class TooManyTurns(ValueError):
    """A task would carry more user turns than ``UMIQ_API_MAX_TURNS`` allows."""


def _check_turns(count: int, settings: Settings) -> None:
    if count > settings.api_max_turns:
        raise TooManyTurns(f"a task may carry at most {settings.api_max_turns} user turns; this one would carry {count}")


@dataclass(frozen=True)
class Outbound:
    """A message to publish once the transaction that created its step has committed.

    ``expires_s`` is :func:`~orchestrator.queues.step_expiry_s`: a copy older than that has been re-sent by the sweeper,
    so the worker drops it instead of running a step that may have killed its worker (or been dead-lettered) once more.
    """

    task_name: str
    kwargs: dict[str, Any]
    expires_s: float | None = None


def publish(messages: Sequence[Outbound], engine: sa.Engine | None = None) -> None:
    """Send after commit. A step the broker refused keeps no dispatch time, so the sweeper re-sends it next round."""
    unsent: list[int] = []
    for message in messages:
        try:
            send(message.task_name, message.kwargs, expires=message.expires_s)
        except Exception as exc:  # broker down: the sweeper re-sends from the store
            log.warning("step.publish_failed", step_id=message.kwargs.get("step_id"), error=repr(exc))
            unsent.append(message.kwargs["step_id"])
    if unsent and engine is not None:
        try:
            with session_scope(engine) as session:
                session.execute(
                    sa.update(Step).where(Step.id.in_(unsent), Step.status == StepStatus.QUEUED).values(dispatched_at=None)
                )
        except Exception as exc:  # the database is down too: the sweeper still finds these steps by their age
            log.warning("step.unsent_not_recorded", step_ids=unsent, error=repr(exc))


# ----------------------------------------------------------------------------------------------------------- submit


def _catalog_specs(session: Session, names: Sequence[str]) -> list[dict[str, Any]]:
    rows = {row.name: row for row in session.exec(select(ToolCatalog).where(ToolCatalog.name.in_(list(names))))}
    missing = [name for name in names if name not in rows]
    if missing:
        known = sorted(session.exec(select(ToolCatalog.name)).all())
        raise UnknownToolSet(
            f"unknown tool set(s): {', '.join(missing)}; known: {', '.join(known) or 'none (is a tools pool running?)'}"
        )
    return [spec for name in names for spec in rows[name].specs]


def _check_withheld(spec: TaskSpec, tool_specs: Sequence[dict[str, Any]]) -> None:
    unknown = sorted(set(spec.options.tools_withheld_until) - {tool["name"] for tool in tool_specs})
    if unknown:
        raise UnknownTool(f"withheld tool(s) not in the task's tool sets {', '.join(spec.tools) or '(none)'}: {', '.join(unknown)}")


def _visible_specs(task: Task, trajectory: Trajectory, turn: int) -> list[dict[str, Any]]:
    """The tool specs the models may see in ``turn``: a tool withheld until a later turn is left out of the prompts
    and out of the names a call may use, so calling it early is a hallucinated call that runs nothing."""
    withheld: dict[str, int] = task.options.get("tools_withheld_until", {})
    return [spec for spec in trajectory.tool_specs if withheld.get(spec["name"], 0) <= turn]


def submit(engine: sa.Engine, spec: TaskSpec, settings: Settings, *, owner: str | None = None) -> Task:
    """Store the task, its trajectory, the first user message and the first planner step; then publish that step."""
    _check_turns(len(spec.turns), settings)
    with session_scope(engine) as session:
        specs = _catalog_specs(session, spec.tools)
        _check_withheld(spec, specs)
        task = Task(
            owner=owner,
            turns=list(spec.turns),
            toolsets=list(spec.tools),
            initial_config=spec.initial_config,
            options=spec.options.model_dump(exclude_defaults=True),
            meta=spec.meta,
        )
        session.add(task)
        trajectory = Trajectory(task_id=task.id, tool_specs=specs)
        session.add(trajectory)
        session.flush()
        transcript: list[protocol.Message] = []
        _add_messages(session, trajectory, transcript, [protocol.Message(protocol.Speaker.USER, spec.turns[0])])
        outbound = _create_step(session, task, trajectory, StepKind.PLANNER, {}, settings, transcript)
    publish([outbound], engine)
    log.info("task.submitted", task_id=task.id, trajectory_id=trajectory.id, turns=len(spec.turns), tools=spec.tools)
    return task


def append_turn(engine: sa.Engine, task_id: str, text: str, settings: Settings, *, owner: str | None = None) -> Task:
    """A new user turn continues the same trajectory (same history, same tool state).

    While the trajectory runs the turn just waits its turn; once it has finished, the next turn that never ran (the
    new one, unless the trajectory failed early) starts at once.
    """
    with session_scope(engine) as session:
        task = session.get(Task, task_id, with_for_update=True)
        if task is None or (owner is not None and task.owner != owner):
            raise NotFound(task_id)
        _check_turns(len(task.turns) + 1, settings)
        trajectory = _latest_trajectory(session, task_id, lock=True)
        task.turns = [*task.turns, text]
        session.add(task)
        if trajectory.status == TrajectoryStatus.RUNNING:
            return task
        trajectory.status = TrajectoryStatus.RUNNING
        trajectory.failure = None
        trajectory.finished_at = None
        trajectory.turn += 1
        trajectory.turn_planner_steps = 0
        transcript = history(session, trajectory.id)
        _add_messages(session, trajectory, transcript, [protocol.Message(protocol.Speaker.USER, task.turns[trajectory.turn])])
        outbound = _create_step(session, task, trajectory, StepKind.PLANNER, {}, settings, transcript)
    publish([outbound], engine)
    return task


def add_feedback(
    engine: sa.Engine, task_id: str, score: float, comment: str | None, *, owner: str | None = None
) -> int:
    """Attach a score and comment to the task's latest trajectory; returns the feedback id."""
    with session_scope(engine) as session:
        task = session.get(Task, task_id)
        if task is None or (owner is not None and task.owner != owner):
            raise NotFound(task_id)
        feedback = Feedback(trajectory_id=_latest_trajectory(session, task_id).id, score=score, comment=comment, owner=owner)
        session.add(feedback)
        session.flush()
        return feedback.id


def _latest_trajectory(session: Session, task_id: str, *, lock: bool = False) -> Trajectory:
    query = select(Trajectory).where(Trajectory.task_id == task_id).order_by(Trajectory.created_at.desc()).limit(1)
    if lock:
        query = query.with_for_update()
    return session.exec(query).one()


# ------------------------------------------------------------------------------------------------- step creation


def _message_rows(
    trajectory: Trajectory | Record,
    transcript: list[protocol.Message],
    messages: Sequence[protocol.Message],
    step_id: int | None = None,
) -> list[dict[str, Any]]:
    """Append to the trajectory's history; ``transcript`` is that history as loaded in this transaction.

    Its length is the next message's seq and it is kept up to date, so the hot path neither counts nor re-reads rows
    (the trajectory row is locked, so nobody else appends meanwhile). Returns the rows for :func:`_insert_messages`.
    """
    rows = []
    now = utcnow()
    for message in messages:
        rows.append(
            {
                "trajectory_id": trajectory.id,
                "seq": len(transcript),
                "turn": trajectory.turn,
                "speaker": message.speaker.value,
                "content": message.content,
                "step_id": step_id,
                "created_at": now,
            }
        )
        transcript.append(message)
    return rows


def _insert_messages(conn: Executor, rows: list[dict[str, Any]]) -> None:
    """All of a result's new messages in one statement (an executemany, which psycopg pipelines into one round trip)."""
    if rows:
        conn.execute(_INSERT_MESSAGES, rows)


def _add_messages(
    conn: Executor,
    trajectory: Trajectory | Record,
    transcript: list[protocol.Message],
    messages: Sequence[protocol.Message],
    step_id: int | None = None,
) -> None:
    _insert_messages(conn, _message_rows(trajectory, transcript, messages, step_id))


def history(conn: Executor, trajectory_id: str) -> list[protocol.Message]:
    """The trajectory's messages in order; two columns, not whole rows, since this runs for every result."""
    rows = conn.execute(_HISTORY, {"trajectory_id": trajectory_id}).all()
    return [protocol.Message(protocol.Speaker(speaker), content) for speaker, content in rows]


def _create_step(
    conn: Executor,
    task: Task | Record,
    trajectory: Trajectory | Record,
    kind: StepKind,
    request: dict[str, Any],
    settings: Settings,
    transcript: list[protocol.Message],
) -> Outbound:
    """A new queued step, inserted by :func:`_dispatch`; advances the trajectory's counters, which its caller writes
    (an ORM trajectory in submit and append_turn with their flush, a record with :func:`_write_trajectory`)."""
    step = Record(
        id=None,
        trajectory_id=trajectory.id,
        seq=trajectory.next_seq,
        turn=trajectory.turn,
        kind=kind,
        status=StepStatus.QUEUED,
        attempt=0,
        request=request,
        error=None,
        idempotency_key=f"{trajectory.id}/{trajectory.next_seq}",
    )
    trajectory.next_seq += 1
    if kind == StepKind.PLANNER:
        trajectory.planner_steps += 1
        trajectory.turn_planner_steps += 1
    trajectory.updated_at = utcnow()
    return _dispatch(conn, task, trajectory, step, settings, transcript)


def _dispatch(
    conn: Executor,
    task: Task | Record,
    trajectory: Trajectory | Record,
    step: Record,
    settings: Settings,
    transcript: list[protocol.Message] | None = None,
) -> Outbound:
    """Build the message for a step from the stored state; the same function re-sends a step the broker lost.

    A new step is inserted with its dispatch time (which gives it its id); a re-sent one gets its new dispatch time,
    attempt and error written.
    """
    step.dispatched_at = utcnow()
    if step.id is None:
        step.id = conn.execute(
            _INSERT_STEP,
            {
                "trajectory_id": step.trajectory_id,
                "seq": step.seq,
                "turn": step.turn,
                "kind": step.kind,
                "status": step.status,
                "idempotency_key": step.idempotency_key,
                "attempt": step.attempt,
                "request": step.request,
                "created_at": step.dispatched_at,
                "dispatched_at": step.dispatched_at,
            },
        ).inserted_primary_key[0]
    else:
        conn.execute(_REDISPATCH, {"step_id": step.id, "attempt": step.attempt, "error": step.error, "dispatched_at": step.dispatched_at})
    base = {"step_id": step.id, "attempt": step.attempt, "trajectory_id": trajectory.id, "turn": step.turn, "seq": step.seq}
    expires = step_expiry_s(settings)
    if step.kind == StepKind.TOOL:
        return Outbound(EXECUTE_TOOL, {**base, **_tool_payload(conn, task, trajectory, step, settings)}, expires)
    role = ModelRole(step.kind)
    payload = {**base, **_model_payload(conn, task, trajectory, step, role, settings, transcript)}
    return Outbound(generate_task_name(role.value), payload, expires)


def _model_payload(
    conn: Executor,
    task: Task,
    trajectory: Trajectory,
    step: Step,
    role: ModelRole,
    settings: Settings,
    transcript: list[protocol.Message] | None,
) -> dict[str, Any]:
    compat = settings.prompt_mode == "compat"
    tools = [ToolSpec.from_dict(spec) for spec in _visible_specs(task, trajectory, step.turn)]
    messages = transcript if transcript is not None else history(conn, trajectory.id)
    chars = settings.doc_description_chars
    if role is ModelRole.PLANNER:
        prompt = protocol.render_planner(tools, messages, compat=compat, description_chars=chars)
    elif role is ModelRole.CALLER:
        rationale = step.request.get("rationale", "")
        prompt = protocol.render_caller(tools, messages, rationale, compat=compat, description_chars=chars)
    else:
        prompt = protocol.render_summarizer(messages, compat=compat)
    return {"prompt": prompt, "stop": protocol.stop_strings(role, compat=compat)}


def _tool_payload(conn: Executor, task: Task | Record, trajectory: Trajectory | Record, step: Record, settings: Settings) -> dict[str, Any]:
    executed = conn.execute(_PAST_CALLS, {"trajectory_id": trajectory.id, "step_id": step.id}).all()
    return {
        "toolsets": task.toolsets,
        "config": task.initial_config,
        "past_calls": [[tool, arguments] for tool, arguments in executed],
        "tool": step.request["tool"],
        "arguments": step.request["arguments"],
        "max_chars": settings.observation_chars,
    }


# ------------------------------------------------------------------------------------------------ result handling


def _state(task: Task, trajectory: Trajectory, settings: Settings) -> machine.State:
    return machine.State(
        turns=task.turns,
        turn=trajectory.turn,
        planner_steps=trajectory.planner_steps,
        turn_planner_steps=trajectory.turn_planner_steps,
        max_steps_per_turn=task.options.get("max_steps_per_turn", settings.max_steps_per_turn),
        max_steps=task.options.get("max_steps", settings.max_steps_per_trajectory),
        tool_names=frozenset(spec["name"] for spec in _visible_specs(task, trajectory, trajectory.turn)),
    )


def _record(step: Step, result: dict[str, Any]) -> None:
    step.raw_text = result.get("text", result.get("observation"))
    step.tokens_in = result.get("tokens_in")
    step.tokens_out = result.get("tokens_out")
    step.latency_ms = result.get("latency_ms")
    step.batch_size = result.get("batch_size")
    step.model_version = result.get("model_version")
    step.worker = result.get("worker")
    step.finished_at = utcnow()
    step.status = StepStatus.DONE


def _transition(conn: Executor, task: Record, trajectory: Record, step: Record, settings: Settings) -> machine.Transition:
    """Parse the step's raw text with the protocol and ask the state machine what follows."""
    state = _state(task, trajectory, settings)
    text = step.raw_text or ""
    if step.kind == StepKind.PLANNER:
        out = protocol.parse_planner(text)
        step.parsed = {"rationale": out.rationale, "decision": out.decision}
        step.parse_error = out.error
        return machine.after_planner(state, out, trajectory.outcomes)
    if step.kind == StepKind.CALLER:
        caller = protocol.parse_caller(text)
        step.parsed = {"tool": caller.tool, "arguments": caller.arguments}
        step.parse_error = caller.error
        return machine.after_caller(state, caller)
    if step.kind == StepKind.SUMMARIZER:
        summary = protocol.parse_summarizer(text)
        step.parsed = {"answer": summary.answer}
        step.parse_error = summary.error
        return machine.after_summarizer(state, summary, trajectory.outcomes)
    return machine.after_tool(state, text)


def _apply(
    conn: sa.Connection, task: Record, trajectory: Record, step: Record, result: dict[str, Any], settings: Settings
) -> list[Outbound]:
    """Store the step's outcome and create the next step.

    What needs an answer from the server comes first: the history, and the next step's insert (its id goes into its
    message and the tool-call row). The writes that need none (the step's result, the observation, the new messages,
    the tool call, the trajectory) then go together in one round trip (:func:`~orchestrator.store.pipelined`).
    """
    transition = _transition(conn, task, trajectory, step, settings)
    transcript = history(conn, trajectory.id)
    rows = _message_rows(trajectory, transcript, transition.messages, step.id)
    if transition.outcome is not None:
        trajectory.outcomes = [*trajectory.outcomes, transition.outcome]
    if transition.next_user is not None:
        trajectory.turn += 1
        trajectory.turn_planner_steps = 0
        rows += _message_rows(trajectory, transcript, [protocol.Message(protocol.Speaker.USER, transition.next_user)])
    trajectory.updated_at = utcnow()
    outbound: list[Outbound] = []
    if transition.finish is not None:
        trajectory.status = transition.finish
        trajectory.failure = transition.failure
        trajectory.finished_at = utcnow()
    elif transition.next_kind is not None:
        outbound.append(
            _create_step(conn, task, trajectory, transition.next_kind, transition.next_request, settings, transcript)
        )
    with pipelined(conn):
        _write_step_result(conn, step)
        if step.kind == StepKind.TOOL:
            conn.execute(_TOOL_OBSERVED, {"step_id": step.id, "observation": step.raw_text, "error": result.get("error")})
        _insert_messages(conn, rows)
        if transition.call is not None:
            _insert_tool_call(conn, step, trajectory, transition, outbound)
        _write_trajectory(conn, trajectory)
    return outbound


def _insert_tool_call(
    conn: Executor, step: Record, trajectory: Record, transition: machine.Transition, outbound: list[Outbound]
) -> None:
    """The caller's call, with the tool step that runs it (none for a hallucinated call, whose observation is the error)."""
    tool, arguments = transition.call
    conn.execute(
        _INSERT_TOOLCALL,
        {
            "trajectory_id": trajectory.id,
            "turn": step.turn,
            "caller_step_id": step.id,
            "tool_step_id": outbound[0].kwargs["step_id"] if transition.next_kind == StepKind.TOOL else None,
            "tool": tool,
            "arguments": arguments,
            "hallucinated": transition.hallucinated,
            "observation": transition.messages[-1].content if transition.hallucinated else None,
            "error": None,
            "created_at": utcnow(),
        },
    )


def _fail_step(conn: Executor, task: Record, trajectory: Record, step: Record, error: str, settings: Settings) -> list[Outbound]:
    """A step whose pool reported an error is retried until ``max_attempts``, then dead-lettered with its trajectory."""
    if step.attempt + 1 < settings.max_attempts:
        step.attempt += 1
        step.error = error
        return [_dispatch(conn, task, trajectory, step, settings)]
    step.status = StepStatus.DEAD
    step.error = error
    step.finished_at = utcnow()
    _write_step_result(conn, step)
    trajectory.status = TrajectoryStatus.FAILED
    trajectory.failure = f"step {step.seq} ({step.kind}) dead after {step.attempt + 1} attempts: {error}"
    trajectory.finished_at = utcnow()
    _write_trajectory(conn, trajectory)
    log.error("step.dead", error=error, attempts=step.attempt + 1)
    return []


def handle_result(engine: sa.Engine, step_id: int, result: dict[str, Any], settings: Settings) -> None:
    """Apply one pool's result exactly once: the first result for a queued step wins, later copies are ignored.

    ``step.applied`` is logged after the commit and the publish, not before: rendering it is a few tenths of a
    millisecond that the next step's message no longer waits for.
    """
    with engine.begin() as conn:
        row = conn.execute(_LOAD_FOR_RESULT, {"step_id": step_id}).one_or_none()
        if row is None:
            log.warning("step.unknown", step_id=step_id)
            return
        step, trajectory, task = _records(row)
        ids = (trajectory.id, step.turn, step.seq, step.kind)
        if step.status != StepStatus.QUEUED or trajectory.status != TrajectoryStatus.RUNNING:
            with bind_step(*ids):
                log.info("step.duplicate_result", status=step.status)
            return
        with bind_step(*ids):  # what the state machine and the store log (step.dead) carries the step's ids too
            if result.get("error") and step.kind != StepKind.TOOL:
                outbound = _fail_step(conn, task, trajectory, step, str(result["error"]), settings)
            else:
                _record(step, result)
                outbound = _apply(conn, task, trajectory, step, result, settings)
    publish(outbound, engine)
    with bind_step(*ids):
        log.info(
            "step.applied",
            tokens_in=step.tokens_in,
            tokens_out=step.tokens_out,
            latency_ms=step.latency_ms,
            parse_error=step.parse_error,
            next=[o.task_name for o in outbound],
            trajectory_status=trajectory.status,
        )


@dataclass(frozen=True)
class _BrokerView:
    """What the sweeper reads from the broker; ``None`` where it could not tell (embedded broker, broker down)."""

    started_at: datetime | None
    waiting: dict[str, int] | None


def _broker_view() -> _BrokerView:
    """How many messages wait per step queue, and when Redis last started if it keeps no journal (append-only file).

    A Redis without a journal forgets every message when it restarts; one with a journal replays them, so its restart
    loses nothing worth re-sending.
    """
    try:
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            waiting = {kind.value: channel.queue_declare(queue=kind.value).message_count for kind in StepKind}
            client = getattr(channel, "client", None)
            info = client.info() if hasattr(client, "info") else {}
    except Exception as exc:  # broker down: steps are re-sent once it answers again
        log.warning("sweep.broker_unreadable", error=repr(exc))
        return _BrokerView(None, None)
    forgetful = "uptime_in_seconds" in info and not info.get("aof_enabled")
    return _BrokerView(utcnow() - timedelta(seconds=info["uptime_in_seconds"]) if forgetful else None, waiting)


def _not_the_steps_fault(step: Record, broker: _BrokerView) -> str | None:
    """Why a step's message is gone through no fault of the step, or None when a worker took it and never answered."""
    if step.dispatched_at is None:
        return "never reached the broker"
    if broker.started_at is not None and step.dispatched_at < broker.started_at:
        return "the broker restarted since it was sent"
    if broker.waiting is None or broker.waiting.get(step.kind, 0) > 0:
        return "it may still be waiting in a busy queue"
    return None


def sweep(engine: sa.Engine, settings: Settings, *, older_than_s: float | None = None) -> int:
    """Re-send every queued step whose message is gone; returns how many were re-sent or dead-lettered.

    A step is re-sent when its message never reached the broker, when the broker restarted after it was sent (Redis
    without persistence forgets every message), or when no result came within ``UMIQ_SWEEP_AFTER_S``. Only that last
    case can be the step's own doing, and only if its queue is empty (a worker took the message and never answered:
    it may have crashed or hung on it): then the re-send counts as an attempt, so a step that keeps killing its worker
    is dead-lettered. A message that may just be waiting behind others is re-sent without counting.

    A worker that dies takes every step it was running with it, so the steps of one crash come back together; if
    they die together again, one of them may be the culprit. From then on they go back one at a time per pool (a
    suspect waits while another suspect of its kind is out), so the culprit dies alone and the rest complete.
    """
    older = older_than_s if older_than_s is not None else settings.resolved_sweep_after_s
    horizon = utcnow() - timedelta(seconds=older)
    broker = _broker_view()
    dispatched_at = _STEP.c.dispatched_at
    gone = (dispatched_at == None) | (dispatched_at < horizon)  # noqa: E711
    if broker.started_at is not None:
        gone = gone | (dispatched_at < broker.started_at)
    outbound: list[Outbound] = []
    handled = 0
    with engine.begin() as conn:
        # FOR UPDATE without OF locks the trajectory rows too: a trajectory whose result is being applied is skipped.
        stale = conn.execute(
            sa.select(_STEP.c.id)
            .join_from(_STEP, _TRAJECTORY, _TRAJECTORY.c.id == _STEP.c.trajectory_id)
            .where(_STEP.c.status == StepStatus.QUEUED, _TRAJECTORY.c.status == TrajectoryStatus.RUNNING)
            .where(gone)
            .order_by(dispatched_at)
            .with_for_update(skip_locked=True)
        ).scalars().all()
        suspects_out = set(
            conn.execute(
                sa.select(_STEP.c.kind)
                .where(_STEP.c.status == StepStatus.QUEUED, _STEP.c.attempt >= 1, dispatched_at >= horizon)
                .distinct()
            ).scalars().all()
        )
        for step_id in stale:
            step, trajectory, task = _records(conn.execute(_LOAD_FOR_RESULT, {"step_id": step_id}).one())
            with bind_step(trajectory.id, step.turn, step.seq, step.kind):
                reason = _not_the_steps_fault(step, broker)
                if reason is not None:
                    log.warning("step.resent", attempt=step.attempt, reason=reason)
                    outbound.append(_dispatch(conn, task, trajectory, step, settings))
                    handled += 1
                    continue
                if step.attempt >= 1 and step.attempt + 1 < settings.max_attempts:
                    if step.kind in suspects_out:
                        continue
                    suspects_out.add(step.kind)
                log.warning("step.resent", attempt=step.attempt + 1, reason="no result")
                error = f"no result {older:.0f} s after it was sent (its worker may have died on it); re-sent by the sweeper"
                outbound.extend(_fail_step(conn, task, trajectory, step, error, settings))
                handled += 1
    publish(outbound, engine)
    return handled
