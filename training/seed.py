"""BFCL seed trajectories: complete α-UMi trajectories built by running BFCL's ground truth in its environments.

Before umiq has traffic of its own, GLPFT needs trajectories (DESIGN §5). For every user turn of a BFCL
multi-turn entry, each ground-truth call becomes one planner step (a templated rationale naming the call and
``Next: caller.``), one caller step (the call in the protocol's ``Action:`` / ``Action Input:`` format) and the
observation the environment really returns, run through :func:`workers.tools.registry.execute` exactly as the tool
pool runs it (same truncation). A final planner step ``Next: conclusion.`` and a summary templated from the turn's
observations close the turn. Everything is deterministic, so the same entry always yields the same trajectory.

Rules for what BFCL has and the serving path does not:

- A turn whose ground truth is empty (3 in ``multi_turn_base``, the withheld-function or withheld-parameter turn of
  every ``multi_turn_miss_func`` / ``multi_turn_miss_param`` entry) is the request the agent cannot fulfil: one
  planner step ``Next: conclusion.`` and a summary saying what is missing (a tool, a detail), per category.
  Concluding rather than giving up is deliberate: BFCL scores such a turn by the absence of state changes, and
  umiq's machine counts a give-up as a failed turn.
- ``multi_turn_miss_func`` withholds functions until a later turn reveals them; a trajectory has one tool list
  (as ``Trajectory.tool_specs`` has in the store), so those entries are seeded up to, not including, the first
  revealing turn, with the withheld functions left out of the tool docs. One entry's ground truth calls a function
  before BFCL reveals it (``multi_turn_miss_func_49`` calls ``tail`` in turn 1, revealed in turn 3): it cannot be
  seeded consistently, so :func:`seed_trajectories` skips it with a warning (:class:`UnseedableEntry`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import structlog

from orchestrator.protocol import Decision, Message, Speaker, ToolSpec, format_call, format_planner
from training.samples import Trajectory
from workers.tools import bfcl
from workers.tools.registry import StateCache, execute, specs_for

__all__ = ["SOURCE", "OBSERVATION_CHARS", "UnseedableEntry", "seed_trajectories", "seed_trajectory"]

log = structlog.get_logger(__name__)

SOURCE = "bfcl_seed"
"""``Trajectory.source`` of seed trajectories."""

OBSERVATION_CHARS = 1024
"""Observation length, as the serving path's default (``UMIQ_OBSERVATION_CHARS``) and the reference."""

_SUMMARY_OBSERVATION_CHARS = 160
"""How much of each observation a templated summary quotes; summaries stay short, as a summarizer's should."""

_DESCRIPTION_MARK = "Tool description: "
"""BFCL descriptions open with a sentence about the tool's class; the tool's own purpose follows this mark."""

_CANNOT = {
    "multi_turn_miss_func": "none of the tools I have can do it. Tell me when a tool for it is available.",
    "multi_turn_miss_param": "a detail it needs is missing. Please tell me the missing detail.",
}
_CANNOT_DEFAULT = "the tools and information I have do not allow it."

Call = tuple[str, dict[str, Any]]


class UnseedableEntry(ValueError):
    """A BFCL entry whose ground truth calls a tool the entry's documentation does not show at that turn."""


def _purpose(spec: ToolSpec) -> str:
    """The first sentence of what the tool itself does."""
    text = spec.description.split(_DESCRIPTION_MARK, 1)[-1].strip()
    return text.split(". ", 1)[0].rstrip(".") + "."


def _arguments_text(arguments: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items()) or "no arguments"


def _call_rationale(spec: ToolSpec, arguments: Mapping[str, Any]) -> str:
    return f"The next step is {spec.name} with {_arguments_text(arguments)}. What it does: {_purpose(spec)}"


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def _summary(calls: Sequence[Call], observations: Sequence[str], category: str) -> tuple[str, str]:
    """The closing rationale and the summary of one turn, from the calls it made and what they returned."""
    if not calls:
        return (
            "This request cannot be fulfilled with what I have, so I tell the user why.",
            f"I cannot do this: {_CANNOT.get(category, _CANNOT_DEFAULT)}",
        )
    names = ", ".join(name for name, _ in calls)
    results = "; ".join(
        f"{name} returned {_clip(obs, _SUMMARY_OBSERVATION_CHARS)}"
        for (name, _), obs in zip(calls, observations, strict=True)
    )
    return f"The request is done ({names}), so I can answer.", f"Done. {results}"


def _seeded_turns(task: Mapping[str, Any]) -> int:
    """All turns, except for withheld functions: the turns before the first one that reveals them."""
    missed: Mapping[int, Sequence[str]] = task["missed_function"]
    return min(missed, default=len(task["turns"]))


class _Runner:
    """Runs one entry's calls in order through the registry, as the tool pool would, remembering the calls so far."""

    def __init__(self, task: Mapping[str, Any], hidden: Collection[str], observation_chars: int) -> None:
        self.task = task
        self.hidden = hidden
        self.observation_chars = observation_chars
        self.past: list[Call] = []
        self.cache = StateCache(maxsize=1)

    def __call__(self, name: str, arguments: dict[str, Any]) -> str:
        observation = execute(
            self.task["toolsets"],
            self.task["initial_config"],
            self.past,
            name,
            arguments,
            max_chars=self.observation_chars,
            hidden=self.hidden,
            cache=self.cache,
        )
        if observation.hallucinated:
            raise UnseedableEntry(f"{self.task['bfcl_id']}: ground-truth call {name!r} is not among the entry's tools")
        self.past.append((name, arguments))
        return observation.content


def _turn(calls: Sequence[Call], specs: Mapping[str, ToolSpec], run: _Runner, category: str) -> list[Message]:
    messages: list[Message] = []
    observations: list[str] = []
    for name, arguments in calls:
        observation = run(name, arguments)
        observations.append(observation)
        messages += [
            Message(Speaker.PLANNER, format_planner(_call_rationale(specs[name], arguments), Decision.CALL)),
            Message(Speaker.CALLER, format_call(name, arguments)),
            Message(Speaker.OBSERVATION, observation),
        ]
    rationale, answer = _summary(calls, observations, category)
    messages += [
        Message(Speaker.PLANNER, format_planner(rationale, Decision.CONCLUSION)),
        Message(Speaker.SUMMARIZER, answer),
    ]
    return messages


def seed_trajectory(entry: Mapping[str, Any], *, observation_chars: int = OBSERVATION_CHARS) -> Trajectory:
    """One BFCL entry's seed trajectory; ``task_id`` is the entry id, the key of the train/dev/test split."""
    task = bfcl.entry_task(entry)
    n_turns = _seeded_turns(task)
    hidden = bfcl.hidden_tools(task, n_turns - 1)
    tools = specs_for(task["toolsets"], hidden=hidden)
    specs = {spec.name: spec for spec in tools}
    run = _Runner(task, hidden, observation_chars)
    messages: list[Message] = []
    for turn, calls in enumerate(bfcl.ground_truth_calls(entry)[:n_turns]):
        messages.append(Message(Speaker.USER, task["turns"][turn]))
        messages += _turn(calls, specs, run, task["category"])
    meta = {"category": task["category"], "turns": n_turns, "outcome": "ground_truth"}
    return Trajectory(tools, messages, task_id=entry["id"], source=SOURCE, meta=meta)


def seed_trajectories(
    category: str = "multi_turn_base", ids: Iterable[str] | None = None, *, observation_chars: int = OBSERVATION_CHARS
) -> list[Trajectory]:
    """Seed trajectories of a BFCL multi-turn category, of every entry or of those whose id is in ``ids``.

    Callers that train on them pass ``ids=load_split("train")`` (:mod:`training.split`), never all; ids of other
    categories are ignored, so one split serves every category. An id of this category that does not exist raises.
    """
    entries = bfcl.load_entries(category)
    if ids is not None:
        wanted = {i for i in ids if i.rsplit("_", 1)[0] == category}
        missing = wanted - {e["id"] for e in entries}
        if missing:
            raise KeyError(f"no {category} entries with ids {sorted(missing)}")
        entries = [e for e in entries if e["id"] in wanted]
    trajectories = []
    for entry in entries:
        try:
            trajectories.append(seed_trajectory(entry, observation_chars=observation_chars))
        except UnseedableEntry as exc:
            log.warning("seed.entry_skipped", entry=entry["id"], reason=str(exc))
    return trajectories
