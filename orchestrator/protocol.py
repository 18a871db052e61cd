"""The α-UMi protocol: prompt rendering and output parsing for planner, caller and summarizer.

This is the only place that knows the wire format of the three roles. Workers, the orchestrator and training all
import it, so a served prompt and a training prompt can never drift apart. Two rendering modes exist
(``UMIQ_PROMPT_MODE``): ``chat`` hands the model a system + user message pair for its chat template; ``compat``
reproduces the reference repository's plain-text layout byte for byte, so released α-UMi checkpoints plug in.

Parsing never raises on model text: every malformed output becomes a typed result with a :class:`ParseError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "Speaker",
    "ModelRole",
    "MODEL_ROLES",
    "Decision",
    "ParseError",
    "ToolSpec",
    "Message",
    "Prompt",
    "PlannerOutput",
    "CallerOutput",
    "SummaryOutput",
    "BackboneOutput",
    "COMPAT_EOT",
    "render_tool_docs",
    "render_planner",
    "render_caller",
    "render_summarizer",
    "render_backbone",
    "backbone_step",
    "backbone_history",
    "parse_planner",
    "parse_caller",
    "parse_summarizer",
    "parse_backbone",
    "format_planner",
    "format_call",
    "format_backbone_target",
    "stop_strings",
]

COMPAT_EOT = "</s>"
"""The reference's end-of-turn marker between history segments."""


class Speaker(StrEnum):
    """Who wrote a message of the trajectory (the reference's ``from`` field)."""

    USER = "user"
    PLANNER = "assistant"
    CALLER = "caller"
    OBSERVATION = "observation"
    SUMMARIZER = "conclusion"


class ModelRole(StrEnum):
    """The three model roles; each value is also the name of the role's Celery queue."""

    PLANNER = "planner"
    CALLER = "caller"
    SUMMARIZER = "summarizer"


MODEL_ROLES: tuple[str, ...] = tuple(role.value for role in ModelRole)
"""The role names in serving order, where a plain string is wanted (settings sections, env names, registry rows)."""


class Decision(StrEnum):
    """What the planner decided for the next step."""

    CALL = "call"
    CONCLUSION = "conclusion"
    GIVE_UP = "give_up"


class ParseError(StrEnum):
    """Why a model output could not be used; stored with the step and counted, never raised."""

    EMPTY = "empty"
    NO_DECISION = "no_decision"
    NO_ACTION = "no_action"
    NO_ACTION_INPUT = "no_action_input"
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"


_DECISION_WORDS = {
    Decision.CALL: "caller",
    Decision.CONCLUSION: "conclusion",
    Decision.GIVE_UP: "give up",
}


@dataclass(frozen=True)
class ToolSpec:
    """One callable tool as the models see it: a name, a description and a JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolSpec:
        """Accept OpenAI-style ``{"name", "description", "parameters"}`` (optionally under ``function``)."""
        data = data.get("function", data)
        return cls(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            parameters=dict(data.get("parameters") or {"type": "object", "properties": {}}),
        )


@dataclass(frozen=True)
class Message:
    """One message of a trajectory, in the reference's vocabulary of speakers."""

    speaker: Speaker
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"from": self.speaker.value, "value": self.content}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Message:
        return cls(Speaker(data["from"]), str(data["value"]))


Prompt = str | list[dict[str, str]]
"""A rendered prompt: plain text (compat mode) or chat messages for the model's template (chat mode)."""


@dataclass(frozen=True)
class PlannerOutput:
    """A parsed planner step. ``text`` is what enters the history: the rationale up to and including the decision."""

    text: str
    rationale: str
    decision: Decision | None
    error: ParseError | None = None


@dataclass(frozen=True)
class CallerOutput:
    """A parsed caller step: the tool name and its JSON arguments, or the reason they could not be read."""

    text: str
    tool: str | None
    arguments: dict[str, Any] | None
    error: ParseError | None = None


@dataclass(frozen=True)
class SummaryOutput:
    """A parsed summarizer step: the final answer of the turn."""

    answer: str
    error: ParseError | None = None


@dataclass(frozen=True)
class BackboneOutput:
    """A parsed single-agent step: its rationale and decision, with the call (a decision to call) or the answer."""

    text: str
    rationale: str
    decision: Decision | None
    call: CallerOutput | None = None
    answer: str | None = None
    error: ParseError | None = None


# ---------------------------------------------------------------------------------------------- tool documentation


def _compat_input(tool: ToolSpec) -> dict[str, str]:
    props = tool.parameters.get("properties", {}) or {}
    return {name: f"{p.get('type', 'string')}, {p.get('description', '')}" for name, p in props.items()}


def _compact_parameters(tool: ToolSpec, description_chars: int) -> dict[str, Any]:
    props = tool.parameters.get("properties", {}) or {}
    required = set(tool.parameters.get("required", []) or [])
    out: dict[str, Any] = {}
    for name, p in props.items():
        entry: dict[str, Any] = {"type": p.get("type", "string")}
        if p.get("description"):
            entry["description"] = str(p["description"])[:description_chars]
        if "enum" in p:
            entry["enum"] = p["enum"]
        if name not in required:
            entry["optional"] = True
        out[name] = entry
    return out


def render_tool_docs(tools: Sequence[ToolSpec], *, compat: bool, description_chars: int = 256) -> str:
    """One JSON line per tool, descriptions cut to ``description_chars`` (the reference cut them to 256).

    Compat mode uses the reference's ToolBench keys (``Name``/``function``/``input``); chat mode a compact
    name/description/parameters object, since full BFCL schemas overflow a small model's context.
    """
    lines = []
    for t in tools:
        if compat:
            doc: dict[str, Any] = {"Name": t.name, "function": t.description[:description_chars], "input": _compat_input(t)}
        else:
            doc = {
                "name": t.name,
                "description": t.description[:description_chars],
                "parameters": _compact_parameters(t, description_chars),
            }
        lines.append(json.dumps(doc, ensure_ascii=compat))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- rendering

_COMPAT_TOOLS_HEAD = "You have assess to the following apis:\n"
_COMPAT_HISTORY_HEAD = "\n\nThe conversation history is:\n"
_COMPAT_PLANNER_ASK = (
    "\nYou are the assistant to plan what to do next and whether is caller's or conclusion's turn to answer.\n"
    "Answer with a following format:\n"
    "The thought of the next step, followed by Next: caller or conclusion or give up. assistant: "
)
_COMPAT_CALLER_ASK = (
    "\nThe thought of this step is:\n{rationale}\n"
    "Base on the thought make an api call in the following format:\n"
    "Action: the name of api that should be called in this step, should be exactly in [{names}],\n"
    "Action Input: the api call request. caller: "
)
_COMPAT_SUMMARIZER_HEAD = "Make a conclusion based on the conversation history:\n"
_COMPAT_BACKBONE_ASK = (
    "\nYou should answer the action of next step in the following format:\n"
    "The thought to solve the question,\n"
    "Action: the name of api that should be called in this step, should be exactly in [{names}],\n"
    "Action Input: the api call request.\n"
    "Once you think the question is finished, output conclusion: the final answer of the question or give up if "
    "you think you cannot answer this question.\n assistant: "
)

_CHAT_PLANNER_SYSTEM = (
    "You are the planner of a tool-using agent. Read the task and what happened so far, think briefly about the "
    "next step, then end with exactly one decision line: 'Next: caller.' to call a tool, 'Next: conclusion.' when "
    "the user's request is done and can be answered, or 'Next: give up.' when it cannot be done."
)
_CHAT_CALLER_SYSTEM = (
    "You are the caller of a tool-using agent. Turn the planner's thought into exactly one tool call, written as\n"
    "Action: <tool name>\nAction Input: <JSON object of arguments>"
)
_CHAT_SUMMARIZER_SYSTEM = (
    "You are the summarizer of a tool-using agent. Write the final answer to the user's latest request from the "
    "conversation, briefly and only with facts found in it."
)
_CHAT_BACKBONE_SYSTEM = (
    "You are a tool-using agent. Think briefly about the next step, then either call one tool, written as\n"
    "Action: <tool name>\nAction Input: <JSON object of arguments>\n"
    "or answer with 'conclusion: <final answer>', or 'conclusion: give up.' when the request cannot be done."
)


def _compat_history(history: Sequence[Message]) -> str:
    """``speaker: text`` segments, each closed by the end-of-turn marker except observations (as the reference does)."""
    return "".join(
        f"{m.speaker.value}: {m.content}{'' if m.speaker is Speaker.OBSERVATION else COMPAT_EOT}" for m in history
    )


def _chat_history(history: Sequence[Message]) -> str:
    return "\n".join(f"{m.speaker.value}: {m.content}" for m in history)


def _chat(system: str, tools: Sequence[ToolSpec] | None, user: str, description_chars: int) -> list[dict[str, str]]:
    if tools is not None:
        system = f"{system}\n\nAvailable tools:\n{render_tool_docs(tools, compat=False, description_chars=description_chars)}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _compat_prompt(tools: Sequence[ToolSpec], history: Sequence[Message], ask: str, description_chars: int) -> str:
    """The reference layout shared by planner, caller and backbone: tool docs, history, then the role's ask."""
    docs = render_tool_docs(tools, compat=True, description_chars=description_chars)
    return _COMPAT_TOOLS_HEAD + docs + _COMPAT_HISTORY_HEAD + _compat_history(history) + ask


def _tool_names(tools: Sequence[ToolSpec]) -> str:
    return ", ".join(t.name for t in tools)


def render_planner(
    tools: Sequence[ToolSpec], history: Sequence[Message], *, compat: bool = False, description_chars: int = 256
) -> Prompt:
    """The planner sees the tool docs, the task and the whole history, and is asked for a rationale + decision."""
    if compat:
        return _compat_prompt(tools, history, _COMPAT_PLANNER_ASK, description_chars)
    user = f"Conversation so far:\n{_chat_history(history)}\n\nWhat is the next step? End with the decision line."
    return _chat(_CHAT_PLANNER_SYSTEM, tools, user, description_chars)


def render_caller(
    tools: Sequence[ToolSpec],
    history: Sequence[Message],
    rationale: str,
    *,
    compat: bool = False,
    description_chars: int = 256,
) -> Prompt:
    """The caller sees the tool docs, the history (ending with the planner's message) and that rationale again."""
    if compat:
        ask = _COMPAT_CALLER_ASK.format(rationale=rationale, names=_tool_names(tools))
        return _compat_prompt(tools, history, ask, description_chars)
    user = (
        f"Conversation so far:\n{_chat_history(history)}\n\nThe planner's thought for this step:\n{rationale}\n\n"
        "Write the tool call."
    )
    return _chat(_CHAT_CALLER_SYSTEM, tools, user, description_chars)


def render_summarizer(history: Sequence[Message], *, compat: bool = False) -> Prompt:
    """The summarizer sees the history only: no tool documentation, by design of the paper."""
    if compat:
        return _COMPAT_SUMMARIZER_HEAD + _compat_history(history) + " conclusion: "
    user = f"Conversation so far:\n{_chat_history(history)}\n\nWrite the final answer to the user's latest request."
    return _chat(_CHAT_SUMMARIZER_SYSTEM, None, user, 0)


def render_backbone(
    tools: Sequence[ToolSpec], history: Sequence[Message], *, compat: bool = False, description_chars: int = 256
) -> Prompt:
    """The single-agent (GLPFT global stage) prompt: one model plans, calls and concludes.

    ``history`` is the α-UMi history (planner, caller, conclusion messages); it is shown as the single agent would
    have written it (:func:`backbone_history`), which is how the reference renders backbone inputs.
    """
    merged = backbone_history(history)
    if compat:
        return _compat_prompt(tools, merged, _COMPAT_BACKBONE_ASK.format(names=_tool_names(tools)), description_chars)
    user = f"Conversation so far:\n{_chat_history(merged)}\n\nWhat is the next step?"
    return _chat(_CHAT_BACKBONE_SYSTEM, tools, user, description_chars)


# --------------------------------------------------------------------------------------------------- target formats


def format_planner(rationale: str, decision: Decision) -> str:
    """The planner text the reference stores: rationale, a newline, a space, and the decision line."""
    return f"{rationale.rstrip()}\n Next: {_DECISION_WORDS[decision]}."


def format_call(tool: str, arguments: dict[str, Any]) -> str:
    """The caller text: ``Action:`` line then ``Action Input:`` with the arguments as indented JSON."""
    return f"Action: {tool}\nAction Input: {json.dumps(arguments, indent=2, ensure_ascii=False)}"


def format_backbone_target(rationale: str, *, call: str | None = None, answer: str | None = None) -> str:
    """The single-agent target: rationale followed by the action, or by ``conclusion: <answer>``."""
    if call is not None:
        return f"{rationale}\n{call}"
    return f"{rationale}\nconclusion: {answer if answer is not None else 'give up.'}"


def backbone_step(planner: Message, following: Message | None) -> str | None:
    """What the single agent writes for one planner step: its rationale merged with the step's action.

    The action is the caller message that follows (``Action:``/``Action Input:``), the conclusion that follows
    (``conclusion: <answer>``), or ``conclusion: give up.`` for a give-up decision. None when it is no give-up and
    no caller or conclusion message follows it: the step has no action, so no single-agent text exists for it.
    """
    out = parse_planner(planner.content)
    if out.decision is Decision.GIVE_UP:
        return format_backbone_target(out.rationale)
    if following is not None and following.speaker is Speaker.CALLER:
        return format_backbone_target(out.rationale, call=following.content)
    if following is not None and following.speaker is Speaker.SUMMARIZER:
        return format_backbone_target(out.rationale, answer=following.content)
    return None


def backbone_history(history: Sequence[Message]) -> list[Message]:
    """The α-UMi history as one agent wrote it: planner steps merged with their action (:func:`backbone_step`).

    Caller and conclusion messages disappear into the planner message before them; a planner message without an
    action stays as it is. Already merged histories come back unchanged.
    """
    merged = []
    for i, message in enumerate(history):
        if message.speaker in (Speaker.CALLER, Speaker.SUMMARIZER):
            continue
        if message.speaker is Speaker.PLANNER:
            following = history[i + 1] if i + 1 < len(history) else None
            message = Message(Speaker.PLANNER, backbone_step(message, following) or message.content)
        merged.append(message)
    return merged


def stop_strings(role: ModelRole, *, compat: bool = False) -> list[str]:
    """Stop strings each role's generation ends at; the planner's decision lines make it stop right after deciding."""
    common = [COMPAT_EOT] if compat else []
    if role is ModelRole.PLANNER:
        return [*common, *(f"Next: {w}." for w in _DECISION_WORDS.values())]
    if role is ModelRole.CALLER:
        return [*common, "\nObservation", "\nobservation:"]
    return common


# --------------------------------------------------------------------------------------------------------- parsing

_DECISION_RE = re.compile(r"Next\s*:\s*(give\s*up|conclusion|summari[sz]er|caller)\s*\.?", re.IGNORECASE)
_ACTION_RE = re.compile(r"Action\s*:[ \t]*(.*)")
_ACTION_INPUT_RE = re.compile(r"Action\s+Input\s*:")
_CONCLUSION_RE = re.compile(r"conclusion\s*:", re.IGNORECASE)
_GIVE_UP_RE = re.compile(r"give\s*up\b", re.IGNORECASE)


def _decision_of(word: str) -> Decision:
    word = re.sub(r"\s+", " ", word.lower())
    if word == "give up":
        return Decision.GIVE_UP
    if word == "caller":
        return Decision.CALL
    return Decision.CONCLUSION


def parse_planner(text: str) -> PlannerOutput:
    """Keep the text up to the first decision line; no decision is an error to count (the reference assumed caller).

    The kept text is the model's own up to the decision, which is rewritten in its canonical spelling, so history
    and training targets stay byte-identical to the reference for well-formed outputs.
    """
    if not text.strip():
        return PlannerOutput(text="", rationale="", decision=None, error=ParseError.EMPTY)
    match = _DECISION_RE.search(text)
    if match is None:
        stripped = text.strip()
        return PlannerOutput(text=stripped, rationale=stripped, decision=None, error=ParseError.NO_DECISION)
    decision = _decision_of(match.group(1))
    kept = f"{text[: match.start()]}Next: {_DECISION_WORDS[decision]}."
    return PlannerOutput(text=kept, rationale=text[: match.start()].strip(), decision=decision)


def _clean_tool_name(raw: str) -> str:
    return raw.strip().strip("`'\",.").strip()


def _first_json_object(raw: str) -> tuple[Any, ParseError | None]:
    start = raw.find("{")
    if start < 0:
        candidate = raw.strip()
        if not candidate:
            return None, ParseError.BAD_JSON
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            return None, ParseError.BAD_JSON
        return None, ParseError.NOT_OBJECT if value is not None else ParseError.BAD_JSON
    try:
        value, _ = json.JSONDecoder().raw_decode(raw[start:])
    except json.JSONDecodeError:
        return None, ParseError.BAD_JSON
    return value, None


def parse_caller(text: str) -> CallerOutput:
    """The last ``Action:`` and the last ``Action Input:`` win; arguments must be one JSON object."""
    stripped = text.strip()
    if not stripped:
        return CallerOutput(text="", tool=None, arguments=None, error=ParseError.EMPTY)
    actions = [m for m in _ACTION_RE.finditer(stripped) if m.group(1).strip()]
    if not actions:
        return CallerOutput(text=stripped, tool=None, arguments=None, error=ParseError.NO_ACTION)
    tool = _clean_tool_name(actions[-1].group(1))
    inputs = list(_ACTION_INPUT_RE.finditer(stripped))
    if not inputs:
        return CallerOutput(text=stripped, tool=tool, arguments=None, error=ParseError.NO_ACTION_INPUT)
    value, error = _first_json_object(stripped[inputs[-1].end() :])
    if error is not None:
        return CallerOutput(text=stripped, tool=tool, arguments=None, error=error)
    if not isinstance(value, dict):
        return CallerOutput(text=stripped, tool=tool, arguments=None, error=ParseError.NOT_OBJECT)
    return CallerOutput(text=format_call(tool, value), tool=tool, arguments=value)


def parse_summarizer(text: str) -> SummaryOutput:
    """The answer is the text itself, minus a leading ``conclusion:`` some models echo."""
    answer = re.sub(r"^\s*conclusion\s*:\s*", "", text.strip(), flags=re.IGNORECASE).strip()
    if not answer:
        return SummaryOutput(answer="", error=ParseError.EMPTY)
    return SummaryOutput(answer=answer)


def parse_backbone(text: str) -> BackboneOutput:
    """Read what :func:`format_backbone_target` writes: a rationale, then an action or ``conclusion: <answer>``.

    The decision is the output's last marker, a named ``Action:`` or a ``conclusion:``, since the single agent ends
    with it; earlier ones belong to the rationale (ToolBench's thoughts say ``Action:`` before a give-up). An
    answer opening with ``give up`` is the give-up decision, as the reference reads it. The call is read by
    :func:`parse_caller`, so its errors are the caller's; no marker at all is no decision.
    """
    stripped = text.strip()
    if not stripped:
        return BackboneOutput(text="", rationale="", decision=None, error=ParseError.EMPTY)
    named_actions = [m for m in _ACTION_RE.finditer(stripped) if m.group(1).strip()]
    markers = named_actions + list(_CONCLUSION_RE.finditer(stripped))
    if not markers:
        return BackboneOutput(text=stripped, rationale=stripped, decision=None, error=ParseError.NO_DECISION)
    last = max(markers, key=lambda m: m.start())
    rationale = stripped[: last.start()].strip()
    if last.re is _ACTION_RE:
        call = parse_caller(stripped[last.start() :])
        return BackboneOutput(stripped, rationale, Decision.CALL, call=call, error=call.error)
    answer = stripped[last.end() :].strip()
    if _GIVE_UP_RE.match(answer):
        return BackboneOutput(stripped, rationale, Decision.GIVE_UP)
    return BackboneOutput(stripped, rationale, Decision.CONCLUSION, answer=answer, error=None if answer else ParseError.EMPTY)
