"""The trajectory state machine: given where a trajectory stands and a step's parsed result, what happens next.

Pure functions, no I/O: :mod:`orchestrator.engine` loads the state, applies the :class:`Transition` and
dispatches the next step. The loop per user turn is planner → caller → tool → planner … → summarizer; give up
and the step budgets end a turn early; the next user turn continues the same trajectory and tool state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.protocol import (
    CallerOutput,
    Decision,
    Message,
    PlannerOutput,
    Speaker,
    SummaryOutput,
)
from orchestrator.store import StepKind, TrajectoryStatus

__all__ = ["State", "Transition", "after_planner", "after_caller", "after_tool", "after_summarizer", "next_turn_or_end"]


@dataclass(frozen=True)
class State:
    """What the machine needs to know about a trajectory to decide its next step."""

    turns: list[str]
    turn: int
    planner_steps: int
    turn_planner_steps: int
    max_steps_per_turn: int
    max_steps: int
    tool_names: frozenset[str]
    """The tools shown to the models in this turn; a call to any other name is hallucinated and runs nothing."""


@dataclass
class Transition:
    """What to write and what to run next.

    ``messages`` close the current step; ``next_user`` opens the next turn; ``finish`` ends the trajectory.
    """

    messages: list[Message] = field(default_factory=list)
    next_kind: StepKind | None = None
    next_request: dict[str, Any] = field(default_factory=dict)
    call: tuple[str, dict[str, Any]] | None = None
    hallucinated: bool = False
    outcome: dict[str, Any] | None = None
    next_user: str | None = None
    finish: TrajectoryStatus | None = None
    failure: str | None = None


def _plan(state: State, transition: Transition) -> Transition:
    """Schedule a planner step unless a budget forbids it, in which case the turn or the trajectory ends."""
    if state.planner_steps >= state.max_steps:
        transition.outcome = {"turn": state.turn, "outcome": "budget_exhausted", "answer": None}
        transition.finish = TrajectoryStatus.FAILED
        transition.failure = f"step budget of {state.max_steps} planner steps exhausted"
        return transition
    if state.turn_planner_steps >= state.max_steps_per_turn:
        transition.outcome = {"turn": state.turn, "outcome": "budget_exhausted", "answer": None}
        return next_turn_or_end(state, transition)
    transition.next_kind = StepKind.PLANNER
    return transition


def next_turn_or_end(state: State, transition: Transition, outcomes: list[dict[str, Any]] | None = None) -> Transition:
    """After a turn closes: start the next user turn if one is waiting, else finish the trajectory."""
    if state.turn + 1 < len(state.turns):
        transition.next_user = state.turns[state.turn + 1]
        transition.next_kind = StepKind.PLANNER
        return transition
    closed = [*(outcomes or []), *([transition.outcome] if transition.outcome else [])]
    failed = [o["turn"] for o in closed if o["outcome"] != "concluded"]
    if failed:
        transition.finish = TrajectoryStatus.FAILED
        transition.failure = "turns not concluded: " + ", ".join(str(t) for t in failed)
    else:
        transition.finish = TrajectoryStatus.COMPLETED
    return transition


def after_planner(state: State, out: PlannerOutput, outcomes: list[dict[str, Any]]) -> Transition:
    """A planner output with no decision is counted (stored as a parse error) and, as in the reference, goes to the caller."""
    transition = Transition(messages=[Message(Speaker.PLANNER, out.text)] if out.text else [])
    if out.decision is Decision.GIVE_UP:
        transition.outcome = {"turn": state.turn, "outcome": "gave_up", "answer": None}
        return next_turn_or_end(state, transition, outcomes)
    if out.decision is Decision.CONCLUSION:
        transition.next_kind = StepKind.SUMMARIZER
        return transition
    if not out.text:
        return _plan(state, transition)
    transition.next_kind = StepKind.CALLER
    transition.next_request = {"rationale": out.text}
    return transition


def after_caller(state: State, out: CallerOutput) -> Transition:
    """A readable call to a known tool goes to the tool pool; anything else becomes an observation, nothing runs."""
    transition = Transition(messages=[Message(Speaker.CALLER, out.text)] if out.text else [])
    if out.error is not None or out.tool is None or out.arguments is None:
        transition.messages.append(Message(Speaker.OBSERVATION, _error_observation(f"unreadable tool call ({out.error})")))
        return _plan(state, transition)
    transition.call = (out.tool, out.arguments)
    if out.tool not in state.tool_names:
        transition.hallucinated = True
        transition.messages.append(
            Message(Speaker.OBSERVATION, _error_observation(f"no tool named {out.tool!r} exists; nothing was run"))
        )
        return _plan(state, transition)
    transition.next_kind = StepKind.TOOL
    transition.next_request = {"tool": out.tool, "arguments": out.arguments}
    return transition


def after_tool(state: State, observation: str) -> Transition:
    return _plan(state, Transition(messages=[Message(Speaker.OBSERVATION, observation)]))


def after_summarizer(state: State, out: SummaryOutput, outcomes: list[dict[str, Any]]) -> Transition:
    transition = Transition(messages=[Message(Speaker.SUMMARIZER, out.answer)] if out.answer else [])
    outcome = "concluded" if out.error is None else "failed"
    transition.outcome = {"turn": state.turn, "outcome": outcome, "answer": out.answer or None}
    return next_turn_or_end(state, transition, outcomes)


def _error_observation(text: str) -> str:
    return json.dumps({"error": text})
