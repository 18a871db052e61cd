"""The orchestrator's engine: store a step's result, run the state machine, and hand the next step to its pool.

Postgres is the truth and a queue message only a hint. Each result is applied in one transaction that locks the
trajectory row; a step that is no longer queued ignores further results (redelivery, a re-swept duplicate), and
the next step's message is published only after the commit. A message lost after the commit is re-sent by
:func:`sweep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlmodel import Session, select

from orchestrator import machine, protocol
from orchestrator.logs import bind_step
from orchestrator.protocol import ModelRole, ToolSpec
from orchestrator.queues import EXECUTE_TOOL, app, generate_task_name
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
    session_scope,
    utcnow,
)

__all__ = ["UnknownToolSet", "NotFound", "TooManyTurns", "add_feedback", "Outbound", "submit", "append_turn", "handle_result", "sweep", "publish"]

log = structlog.get_logger(__name__)


class UnknownToolSet(ValueError):
    """A task named a tool set no tool pool has published."""


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

    ``expires_s`` is the broker's visibility timeout: a copy Redis hands out again after its worker died is older than
    that, and by then the sweeper has re-sent the step, so the worker drops the copy instead of running a step that
    may have killed its worker (or been dead-lettered) once more.
    """

    task_name: str
    kwargs: dict[str, Any]
    expires_s: float | None = None


def publish(messages: Sequence[Outbound], engine: sa.Engine | None = None) -> None:
    """Send after commit. A step the broker refused keeps no dispatch time, so the sweeper re-sends it next round."""
    unsent: list[int] = []
    for message in messages:
        try:
            app.send_task(message.task_name, kwargs=message.kwargs, expires=message.expires_s)
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


def submit(engine: sa.Engine, spec: TaskSpec, settings: Settings, *, owner: str | None = None) -> Task:
    """Store the task, its trajectory, the first user message and the first planner step; then publish that step."""
    _check_turns(len(spec.turns), settings)
    with session_scope(engine) as session:
        specs = _catalog_specs(session, spec.tools)
        task = Task(
            owner=owner,
            turns=list(spec.turns),
            toolsets=list(spec.tools),
            initial_config=spec.initial_config,
            options=spec.options.model_dump(exclude_none=True),
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


def _add_messages(
    session: Session,
    trajectory: Trajectory,
    transcript: list[protocol.Message],
    messages: Sequence[protocol.Message],
    step_id: int | None = None,
) -> None:
    """Append to the trajectory's history; ``transcript`` is that history as loaded in this transaction.

    Its length is the next message's seq and it is kept up to date, so the hot path neither counts nor re-reads rows
    (the trajectory row is locked, so nobody else appends meanwhile). The rows are written with the next flush.
    """
    for message in messages:
        session.add(
            Message(
                trajectory_id=trajectory.id,
                seq=len(transcript),
                turn=trajectory.turn,
                speaker=message.speaker.value,
                content=message.content,
                step_id=step_id,
            )
        )
        transcript.append(message)


def history(session: Session, trajectory_id: str) -> list[protocol.Message]:
    """The trajectory's messages in order; two columns, not whole rows, since this runs for every result."""
    rows = session.exec(
        select(Message.speaker, Message.content).where(Message.trajectory_id == trajectory_id).order_by(Message.seq)
    ).all()
    return [protocol.Message(protocol.Speaker(speaker), content) for speaker, content in rows]


def _create_step(
    session: Session,
    task: Task,
    trajectory: Trajectory,
    kind: StepKind,
    request: dict[str, Any],
    settings: Settings,
    transcript: list[protocol.Message],
) -> Outbound:
    step = Step(
        trajectory_id=trajectory.id,
        seq=trajectory.next_seq,
        turn=trajectory.turn,
        kind=kind,
        request=request,
        idempotency_key=f"{trajectory.id}/{trajectory.next_seq}",
    )
    trajectory.next_seq += 1
    if kind == StepKind.PLANNER:
        trajectory.planner_steps += 1
        trajectory.turn_planner_steps += 1
    trajectory.updated_at = utcnow()
    session.add(step)
    session.add(trajectory)
    return _dispatch(session, task, trajectory, step, settings, transcript)


def _dispatch(
    session: Session,
    task: Task,
    trajectory: Trajectory,
    step: Step,
    settings: Settings,
    transcript: list[protocol.Message] | None = None,
) -> Outbound:
    """Build the message for a step from the stored state; the same function re-sends a step the broker lost.

    One flush writes everything pending (a new step is inserted with its dispatch time, which gives it its id).
    """
    step.dispatched_at = utcnow()
    session.add(step)
    session.flush()
    base = {"step_id": step.id, "attempt": step.attempt, "trajectory_id": trajectory.id, "turn": step.turn, "seq": step.seq}
    expires = app.conf.broker_transport_options.get("visibility_timeout")
    if step.kind == StepKind.TOOL:
        return Outbound(EXECUTE_TOOL, {**base, **_tool_payload(session, task, trajectory, step, settings)}, expires)
    role = ModelRole(step.kind)
    payload = {**base, **_model_payload(session, trajectory, step, role, settings, transcript)}
    return Outbound(generate_task_name(role.value), payload, expires)


def _model_payload(
    session: Session,
    trajectory: Trajectory,
    step: Step,
    role: ModelRole,
    settings: Settings,
    transcript: list[protocol.Message] | None,
) -> dict[str, Any]:
    compat = settings.prompt_mode == "compat"
    tools = [ToolSpec.from_dict(spec) for spec in trajectory.tool_specs]
    messages = transcript if transcript is not None else history(session, trajectory.id)
    chars = settings.doc_description_chars
    if role is ModelRole.PLANNER:
        prompt = protocol.render_planner(tools, messages, compat=compat, description_chars=chars)
    elif role is ModelRole.CALLER:
        rationale = step.request.get("rationale", "")
        prompt = protocol.render_caller(tools, messages, rationale, compat=compat, description_chars=chars)
    else:
        prompt = protocol.render_summarizer(messages, compat=compat)
    return {"prompt": prompt, "stop": protocol.stop_strings(role, compat=compat)}


def _tool_payload(session: Session, task: Task, trajectory: Trajectory, step: Step, settings: Settings) -> dict[str, Any]:
    executed = session.exec(
        select(ToolCall)
        .where(ToolCall.trajectory_id == trajectory.id, ToolCall.hallucinated == False, ToolCall.observation != None)  # noqa: E711,E712
        .where(ToolCall.tool_step_id != step.id)
        .order_by(ToolCall.id)
    ).all()
    return {
        "toolsets": task.toolsets,
        "config": task.initial_config,
        "past_calls": [[call.tool, call.arguments] for call in executed],
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
        tool_names=frozenset(spec["name"] for spec in trajectory.tool_specs),
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


def _transition(session: Session, task: Task, trajectory: Trajectory, step: Step, settings: Settings) -> machine.Transition:
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
    session: Session, task: Task, trajectory: Trajectory, step: Step, result: dict[str, Any], settings: Settings
) -> list[Outbound]:
    """Store the step's outcome and create the next step; statements are batched into as few flushes as possible."""
    transition = _transition(session, task, trajectory, step, settings)
    session.add(step)
    transcript = history(session, trajectory.id)
    _add_messages(session, trajectory, transcript, transition.messages, step.id)
    if step.kind == StepKind.TOOL:
        session.execute(
            sa.update(ToolCall)
            .where(ToolCall.tool_step_id == step.id)
            .values(observation=step.raw_text, error=result.get("error"))
            .execution_options(synchronize_session=False)
        )
    if transition.outcome is not None:
        trajectory.outcomes = [*trajectory.outcomes, transition.outcome]
    if transition.next_user is not None:
        trajectory.turn += 1
        trajectory.turn_planner_steps = 0
        _add_messages(session, trajectory, transcript, [protocol.Message(protocol.Speaker.USER, transition.next_user)])
    trajectory.updated_at = utcnow()  # before the next step's flush, which then writes the trajectory once
    outbound: list[Outbound] = []
    if transition.finish is not None:
        trajectory.status = transition.finish
        trajectory.failure = transition.failure
        trajectory.finished_at = utcnow()
    elif transition.next_kind is not None:
        outbound.append(
            _create_step(session, task, trajectory, transition.next_kind, transition.next_request, settings, transcript)
        )
    if transition.call is not None:
        tool, arguments = transition.call
        tool_step_id = outbound[0].kwargs["step_id"] if transition.next_kind == StepKind.TOOL else None
        observation = transition.messages[-1].content if transition.hallucinated else None
        session.add(
            ToolCall(
                trajectory_id=trajectory.id,
                turn=step.turn,
                caller_step_id=step.id,
                tool_step_id=tool_step_id,
                tool=tool,
                arguments=arguments,
                hallucinated=transition.hallucinated,
                observation=observation,
            )
        )
    session.add(trajectory)
    return outbound


def _fail_step(session: Session, task: Task, trajectory: Trajectory, step: Step, error: str, settings: Settings) -> list[Outbound]:
    """A step whose pool reported an error is retried until ``max_attempts``, then dead-lettered with its trajectory."""
    if step.attempt + 1 < settings.max_attempts:
        step.attempt += 1
        step.error = error
        return [_dispatch(session, task, trajectory, step, settings)]
    step.status = StepStatus.DEAD
    step.error = error
    step.finished_at = utcnow()
    session.add(step)
    trajectory.status = TrajectoryStatus.FAILED
    trajectory.failure = f"step {step.seq} ({step.kind}) dead after {step.attempt + 1} attempts: {error}"
    trajectory.finished_at = utcnow()
    session.add(trajectory)
    log.error("step.dead", error=error, attempts=step.attempt + 1)
    return []


def handle_result(engine: sa.Engine, step_id: int, result: dict[str, Any], settings: Settings) -> None:
    """Apply one pool's result exactly once: the first result for a queued step wins, later copies are ignored."""
    with session_scope(engine) as session:
        # One round trip loads the three rows and locks the step and its trajectory.
        row = session.exec(
            select(Step, Trajectory, Task)
            .join(Trajectory, Trajectory.id == Step.trajectory_id)
            .join(Task, Task.id == Trajectory.task_id)
            .where(Step.id == step_id)
            .with_for_update(of=[Step, Trajectory])
        ).one_or_none()
        if row is None:
            log.warning("step.unknown", step_id=step_id)
            return
        step, trajectory, task = row
        with bind_step(trajectory.id, step.turn, step.seq, step.kind):
            if step.status != StepStatus.QUEUED or trajectory.status != TrajectoryStatus.RUNNING:
                log.info("step.duplicate_result", status=step.status)
                return
            if result.get("error") and step.kind != StepKind.TOOL:
                outbound = _fail_step(session, task, trajectory, step, str(result["error"]), settings)
            else:
                _record(step, result)
                outbound = _apply(session, task, trajectory, step, result, settings)
            log.info(
                "step.applied",
                tokens_in=step.tokens_in,
                tokens_out=step.tokens_out,
                latency_ms=step.latency_ms,
                parse_error=step.parse_error,
                next=[o.task_name for o in outbound],
                trajectory_status=trajectory.status,
            )
    publish(outbound, engine)


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


def _not_the_steps_fault(step: Step, broker: _BrokerView) -> str | None:
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
    gone = (Step.dispatched_at == None) | (Step.dispatched_at < horizon)  # noqa: E711
    if broker.started_at is not None:
        gone = gone | (Step.dispatched_at < broker.started_at)
    outbound: list[Outbound] = []
    handled = 0
    with session_scope(engine) as session:
        stale = session.exec(
            select(Step)
            .join(Trajectory, Trajectory.id == Step.trajectory_id)
            .where(Step.status == StepStatus.QUEUED, Trajectory.status == TrajectoryStatus.RUNNING)
            .where(gone)
            .order_by(Step.dispatched_at)
            .with_for_update(skip_locked=True)
        ).all()
        suspects_out = set(
            session.exec(
                select(Step.kind)
                .where(Step.status == StepStatus.QUEUED, Step.attempt >= 1, Step.dispatched_at >= horizon)
                .distinct()
            ).all()
        )
        for step in stale:
            trajectory = session.get(Trajectory, step.trajectory_id)
            task = session.get(Task, trajectory.task_id)
            with bind_step(trajectory.id, step.turn, step.seq, step.kind):
                reason = _not_the_steps_fault(step, broker)
                if reason is not None:
                    log.warning("step.resent", attempt=step.attempt, reason=reason)
                    outbound.append(_dispatch(session, task, trajectory, step, settings))
                    handled += 1
                    continue
                if step.attempt >= 1 and step.attempt + 1 < settings.max_attempts:
                    if step.kind in suspects_out:
                        continue
                    suspects_out.add(step.kind)
                log.warning("step.resent", attempt=step.attempt + 1, reason="no result")
                error = f"no result {older:.0f} s after it was sent (its worker may have died on it); re-sent by the sweeper"
                outbound.extend(_fail_step(session, task, trajectory, step, error, settings))
                handled += 1
    publish(outbound, engine)
    return handled
