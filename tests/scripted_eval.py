"""Scripted models for static-evaluation tests: they replay the gold target of any GLPFT prompt, or spoil it on purpose.

Each function takes a rendered prompt, as :class:`workers.backends.scripted.ScriptedBackend` calls it. Gold targets
are looked up by prompt among the samples of :func:`trajectories` (both prompt modes) and of whatever a test adds
with :func:`remember`; a prompt no sample has raises, which the scripted backend turns into a generation error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from orchestrator.protocol import (
    Decision,
    Message,
    Prompt,
    Speaker,
    ToolSpec,
    format_call,
    format_planner,
    parse_caller,
    parse_planner,
)
from tests.fixtures import FIXTURES
from training.alpha_umi import load_alpha_umi_trajectories
from training.samples import Trajectory, glpft_dataset

FIXTURE = FIXTURES / "alpha_umi_raw.json"
HALLUCINATED_PREFIX = "no_such_"

_NUMBER = {"type": "number"}
TOY = Trajectory(
    tools=[
        ToolSpec("add", "Add two numbers.", {"type": "object", "properties": {"a": _NUMBER, "b": _NUMBER}}),
        ToolSpec("echo", "Return the text.", {"type": "object", "properties": {"text": {"type": "string"}}}),
    ],
    messages=[
        Message(Speaker.USER, "What is 2 + 3? Echo the sum."),
        Message(Speaker.PLANNER, format_planner("I add the two numbers.", Decision.CALL)),
        Message(Speaker.CALLER, format_call("add", {"a": 2, "b": 3})),
        Message(Speaker.OBSERVATION, '{"result": 5}'),
        Message(Speaker.PLANNER, format_planner("Now I echo the sum.", Decision.CALL)),
        Message(Speaker.CALLER, format_call("echo", {"text": "5"})),
        Message(Speaker.OBSERVATION, '{"text": "5"}'),
        Message(Speaker.PLANNER, format_planner("The sum is known.", Decision.CONCLUSION)),
        Message(Speaker.SUMMARIZER, "The sum of 2 and 3 is 5."),
    ],
    task_id="toy-1",
)
"""Two-key and one-key calls, so argument scores show half credit; the fixture file has the other cases."""


def trajectories() -> list[Trajectory]:
    """The fixture file's two trajectories (a hallucinated gold call, a ``none`` answer, a give-up) and :data:`TOY`."""
    return [*load_alpha_umi_trajectories(FIXTURE), TOY]


def _key(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


_TARGETS: dict[str, str] = {}
"""Gold target by prompt key, over every remembered trajectory."""


def remember(data: Iterable[Trajectory]) -> None:
    """Make the gold targets of ``data`` replayable, in both prompt modes."""
    data = list(data)
    for compat in (True, False):
        for samples in glpft_dataset(data, compat=compat).values():
            _TARGETS.update((_key(s.prompt), s.target) for s in samples)


remember(trajectories())


def gold(prompt: Prompt) -> str:
    """The gold target of the sample with this prompt."""
    return _TARGETS[_key(prompt)]


def give_up(prompt: Prompt) -> str:
    """A role model that gives up at every step, in the planner's words."""
    return "This cannot be done.\n Next: give up."


def backbone_give_up(prompt: Prompt) -> str:
    """A single agent that gives up at every step, in its own words."""
    return "This cannot be done.\nconclusion: give up."


def hallucinating(prompt: Prompt) -> str:
    """Gold, except that every call names a tool nobody has."""
    return gold(prompt).replace("Action: ", f"Action: {HALLUCINATED_PREFIX}", 1)


def wrong_first_value(prompt: Prompt) -> str:
    """Gold, except that a caller's first argument gets another value (the same key, so half credit)."""
    target = gold(prompt)
    call = parse_caller(target)
    if not target.startswith("Action:") or not call.arguments:
        return target
    first = next(iter(call.arguments))
    return format_call(str(call.tool), {**call.arguments, first: "wrong"})


def reworded_planner(prompt: Prompt) -> str:
    """Gold, except that a planner keeps the gold decision in other words: a cascade hands those words on."""
    target = gold(prompt)
    decision = parse_planner(target).decision
    return target if decision is None else format_planner("Thinking it over.", decision)
