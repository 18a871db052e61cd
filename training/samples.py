"""GLPFT samples from trajectories: one backbone, planner, caller and summarizer sample set per trajectory.

A :class:`Trajectory` is what every source of training data produces (the α-UMi reference layout, BFCL seed runs,
umiq's own store); :func:`glpft_samples` turns it into the samples of the global stage (one backbone for all
steps) and of the local stage (one set per role), rendered by :mod:`orchestrator.protocol`, so a training prompt is
byte for byte the prompt the serving path renders for the same history. The rules follow the reference's
``process_data/toolbench/prepro_*.py`` (X-PLUG/Multi-LLM-Agent); where umiq departs from them, and why, is in
``training/README.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from orchestrator.protocol import (
    Message,
    Prompt,
    Speaker,
    ToolSpec,
    backbone_step,
    parse_caller,
    parse_planner,
    render_backbone,
    render_caller,
    render_planner,
    render_summarizer,
)

__all__ = ["GlpftRole", "Trajectory", "Sample", "NO_ANSWER", "glpft_samples", "glpft_dataset"]

NO_ANSWER = "none"
"""The reference's conclusion text when ToolBench's ``Finish`` carried no final answer; never a summarizer target."""


class GlpftRole(StrEnum):
    """Who a sample trains: the global-stage backbone or one of the three local-stage role models."""

    BACKBONE = "backbone"
    PLANNER = "planner"
    CALLER = "caller"
    SUMMARIZER = "summarizer"


@dataclass(frozen=True)
class Trajectory:
    """A task's tools and its α-UMi messages, plus where it came from.

    ``hallucinated`` holds the indices of caller messages whose tool is not one the trajectory could call: those
    steps never become planner, caller or backbone targets. ``task_id`` is the id the split is keyed by (a BFCL
    entry id for seed and BFCL traffic); ``meta`` carries the rest (outcomes, verdict, category, feedback score).
    """

    tools: list[ToolSpec]
    messages: list[Message]
    task_id: str | None = None
    source: str | None = None
    hallucinated: frozenset[int] = frozenset()
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One training example: the prompt the role sees, the text it must write, and the reference export fields.

    ``prompt`` is the text (compat mode) or chat messages (chat mode) the model is trained on; ``input`` is always
    the reference's plain-text layout, which is what the reference sample files store next to ``tools``,
    ``history`` (the α-UMi messages before the step) and ``target``.
    """

    role: GlpftRole
    prompt: Prompt
    target: str
    tools: list[ToolSpec]
    history: list[Message]
    input: str
    task_id: str | None = None


def _render(
    role: GlpftRole, tools: Sequence[ToolSpec], history: Sequence[Message], *, compat: bool, chars: int
) -> Prompt:
    """The role's prompt for ``history``; the caller's rationale is the planner message it follows, as served."""
    if role is GlpftRole.BACKBONE:
        return render_backbone(tools, history, compat=compat, description_chars=chars)
    if role is GlpftRole.PLANNER:
        return render_planner(tools, history, compat=compat, description_chars=chars)
    if role is GlpftRole.CALLER:
        return render_caller(tools, history, history[-1].content, compat=compat, description_chars=chars)
    return render_summarizer(history, compat=compat)


def _sample(role: GlpftRole, trajectory: Trajectory, end: int, target: str, *, compat: bool, chars: int) -> Sample:
    history = trajectory.messages[:end]
    text = cast(str, _render(role, trajectory.tools, history, compat=True, chars=chars))
    prompt = text if compat else _render(role, trajectory.tools, history, compat=False, chars=chars)
    return Sample(role, prompt, target, trajectory.tools, history, text, trajectory.task_id)


def _targets(trajectory: Trajectory) -> Iterable[tuple[GlpftRole, int, str]]:
    """(role, message index, target) for every trainable step, in trajectory order.

    Planner: every message with a decision, unless the call it asks for is hallucinated. Backbone: the same steps
    merged with their action (give-ups included). Caller: every readable call to a known tool that follows a
    planner message. Summarizer: every conclusion with a real answer.
    """
    messages = trajectory.messages
    for i, message in enumerate(messages):
        following = messages[i + 1] if i + 1 < len(messages) else None
        if message.speaker is Speaker.PLANNER and i + 1 not in trajectory.hallucinated:
            if parse_planner(message.content).decision is not None:
                yield GlpftRole.PLANNER, i, message.content
            merged = backbone_step(message, following)
            if merged is not None:
                yield GlpftRole.BACKBONE, i, merged
        elif message.speaker is Speaker.CALLER and i not in trajectory.hallucinated:
            if i > 0 and messages[i - 1].speaker is Speaker.PLANNER and parse_caller(message.content).error is None:
                yield GlpftRole.CALLER, i, message.content
        elif message.speaker is Speaker.SUMMARIZER and message.content.strip() not in ("", NO_ANSWER):
            yield GlpftRole.SUMMARIZER, i, message.content


def glpft_samples(
    trajectory: Trajectory, *, compat: bool, description_chars: int = 256
) -> dict[GlpftRole, list[Sample]]:
    """The trajectory's backbone, planner, caller and summarizer samples, each role's in trajectory order.

    ``compat`` picks the prompt layout the models will be served with (``UMIQ_PROMPT_MODE``); ``description_chars``
    must equal the serving setting (``UMIQ_DOC_DESCRIPTION_CHARS``) so training and serving prompts agree.
    """
    samples: dict[GlpftRole, list[Sample]] = {role: [] for role in GlpftRole}
    for role, index, target in _targets(trajectory):
        samples[role].append(_sample(role, trajectory, index, target, compat=compat, chars=description_chars))
    return samples


def glpft_dataset(
    trajectories: Iterable[Trajectory], *, compat: bool, description_chars: int = 256
) -> dict[GlpftRole, list[Sample]]:
    """Every trajectory's samples, concatenated per role (trajectory order kept, as the reference files have it)."""
    dataset: dict[GlpftRole, list[Sample]] = {role: [] for role in GlpftRole}
    for trajectory in trajectories:
        for role, samples in glpft_samples(trajectory, compat=compat, description_chars=description_chars).items():
            dataset[role].extend(samples)
    return dataset
