"""What clients send and get back: the task a backend service submits and the views of its progress.

Shared by the HTTP API and the Python client so both validate a task the same way before anything is stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = ["MAX_STEPS", "Turn", "TaskOptions", "TaskSpec", "TurnSpec", "FeedbackSpec", "StepView", "MessageView", "TaskView"]

Turn = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000)]
_NAME = StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
ToolSetName = Annotated[str, _NAME]
ToolName = Annotated[str, _NAME]

MAX_STEPS = 1000
"""The largest planner-step budget one trajectory may ask for."""


class TaskOptions(BaseModel):
    """Per-task overrides of the step budgets (unset means the server's settings), and tools revealed late."""

    model_config = ConfigDict(extra="forbid")

    max_steps_per_turn: int | None = Field(None, ge=1, le=100)
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    tools_withheld_until: dict[ToolName, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        max_length=256,
        description="Tool name -> the first user turn (0-based) whose prompts list it. Before that turn the planner "
        "and caller are not shown the tool and a call to it is answered as a call to a tool that does not exist "
        "(BFCL's miss-function category: functions added in a later turn).",
    )


class TaskSpec(BaseModel):
    """A tool-use task: one or more user turns, the tool sets the agent may use, and their initial state."""

    model_config = ConfigDict(extra="forbid")

    turns: list[Turn] = Field(min_length=1, description="User turns, in order (at most UMIQ_API_MAX_TURNS).")
    tools: list[ToolSetName] = Field(
        default_factory=list, max_length=16, description="Tool set names: BFCL class names or registered tool sets."
    )
    initial_config: dict[str, Any] = Field(default_factory=dict, description="Initial tool state, BFCL-style.")
    options: TaskOptions = Field(default_factory=TaskOptions)
    meta: dict[str, Any] = Field(default_factory=dict, description="Free-form labels, e.g. a BFCL entry id.")


class TurnSpec(BaseModel):
    """A user turn appended to an existing task."""

    model_config = ConfigDict(extra="forbid")

    text: Turn


class FeedbackSpec(BaseModel):
    """A user's judgement of a task's trajectory; the learning loop can train only on well-judged ones."""

    model_config = ConfigDict(extra="forbid")

    score: float = Field(ge=0.0, le=1.0, description="0 = useless, 1 = exactly right.")
    comment: str | None = Field(None, max_length=4000)


class MessageView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    turn: int
    speaker: str
    content: str


class StepView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    turn: int
    kind: str
    status: str
    attempt: int
    raw_text: str | None
    parsed: dict[str, Any] | None
    parse_error: str | None
    error: str | None
    tokens_in: int | None
    tokens_out: int | None
    latency_ms: float | None
    model_version: str | None
    worker: str | None
    created_at: datetime
    finished_at: datetime | None


class TaskView(BaseModel):
    """A task with its trajectory's status, per-turn outcomes, dead letters, and (on request) messages and steps."""

    id: str
    trajectory_id: str
    status: str
    turn: int
    turns: list[str]
    tools: list[str]
    meta: dict[str, Any] = Field(default_factory=dict)
    outcomes: list[dict[str, Any]]
    failure: str | None
    verdict: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None
    messages: list[MessageView] = Field(default_factory=list)
    steps: list[StepView] = Field(default_factory=list)
    dead_letters: list[StepView] = Field(
        default_factory=list, description="Steps given up on after UMIQ_MAX_ATTEMPTS deliveries, each with its last error."
    )
