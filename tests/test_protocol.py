"""The α-UMi protocol: rendering in both modes, round trips, and every way a model output can be malformed."""

from __future__ import annotations

import json

import pytest

from orchestrator import protocol as P
from orchestrator.protocol import Decision, Message, ModelRole, ParseError, Speaker, ToolSpec
from tests.fixtures import reference
from training.alpha_umi import messages_from_alpha_umi, tools_from_toolbench

TOOLS = [
    ToolSpec(
        "get_weather",
        "Current weather of a city. " + "x" * 400,
        {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]},
    ),
    ToolSpec("list_cities", "All known cities", {"type": "object", "properties": {}}),
]

HISTORY = [
    Message(Speaker.USER, "What is the weather in Paris?"),
    Message(Speaker.PLANNER, "I should look up the weather.\n Next: caller."),
    Message(Speaker.CALLER, 'Action: get_weather\nAction Input: {\n  "city": "Paris"\n}'),
    Message(Speaker.OBSERVATION, '{"temp": 21}'),
]


# ----------------------------------------------------------------------------------------------------- rendering


def test_compat_planner_layout_is_the_reference_one() -> None:
    prompt = P.render_planner(TOOLS, HISTORY, compat=True)
    assert isinstance(prompt, str)
    assert prompt.startswith("You have assess to the following apis:\n{\"Name\": \"get_weather\"")
    assert "\n\nThe conversation history is:\nuser: What is the weather in Paris?</s>assistant: " in prompt
    # observations are not closed by the end-of-turn marker; everything else is
    assert 'observation: {"temp": 21}\nYou are the assistant to plan' in prompt
    assert prompt.endswith("followed by Next: caller or conclusion or give up. assistant: ")


def test_compat_tool_docs_cut_descriptions_and_use_toolbench_keys() -> None:
    docs = P.render_tool_docs(TOOLS, compat=True, description_chars=256)
    first = json.loads(docs.splitlines()[0])
    assert first == {"Name": "get_weather", "function": TOOLS[0].description[:256], "input": {"city": "string, City name"}}


def test_compat_caller_repeats_rationale_and_lists_names() -> None:
    rationale = "I should look up the weather.\n Next: caller."
    prompt = P.render_caller(TOOLS, HISTORY[:2], rationale, compat=True)
    assert prompt.endswith(
        f"</s>\nThe thought of this step is:\n{rationale}\nBase on the thought make an api call in the following format:\n"
        "Action: the name of api that should be called in this step, should be exactly in [get_weather, list_cities],\n"
        "Action Input: the api call request. caller: "
    )


def test_summarizer_never_sees_tool_docs() -> None:
    compat = P.render_summarizer(HISTORY, compat=True)
    assert compat.startswith("Make a conclusion based on the conversation history:\nuser: ")
    assert "get_weather\"" not in compat.split("history:\n", 1)[0]
    chat = P.render_summarizer(HISTORY)
    assert [m["role"] for m in chat] == ["system", "user"]
    assert "Available tools" not in chat[0]["content"]


def test_chat_mode_puts_compact_docs_in_the_system_message() -> None:
    chat = P.render_planner(TOOLS, HISTORY)
    assert [m["role"] for m in chat] == ["system", "user"]
    assert "Available tools:" in chat[0]["content"]
    doc = json.loads(chat[0]["content"].split("Available tools:\n", 1)[1].splitlines()[0])
    assert doc["parameters"] == {"city": {"type": "string", "description": "City name"}}
    assert len(doc["description"]) == 256
    assert "observation: {\"temp\": 21}" in chat[1]["content"]


def test_backbone_prompt_and_targets() -> None:
    prompt = P.render_backbone(TOOLS, HISTORY[:1], compat=True)
    assert prompt.endswith("if you think you cannot answer this question.\n assistant: ")
    call = P.format_call("get_weather", {"city": "Paris"})
    assert P.format_backbone_target("Look it up.", call=call) == f"Look it up.\n{call}"
    assert P.format_backbone_target("It is 21.", answer="21 degrees") == "It is 21.\nconclusion: 21 degrees"
    assert P.format_backbone_target("Impossible.") == "Impossible.\nconclusion: give up."


def test_stop_strings_end_planner_right_after_its_decision() -> None:
    assert "Next: caller." in P.stop_strings(ModelRole.PLANNER)
    assert P.stop_strings(ModelRole.SUMMARIZER, compat=True) == ["</s>"]


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("decision", list(Decision))
def test_planner_round_trip(decision: Decision) -> None:
    text = P.format_planner("Some thought about it.", decision)
    out = P.parse_planner(text)
    assert (out.decision, out.rationale, out.text, out.error) == (decision, "Some thought about it.", text, None)


@pytest.mark.parametrize("arguments", [{}, {"city": "Paris"}, {"a": [1, 2, {"b": None}], "ü": "ß"}])
def test_caller_round_trip(arguments: dict) -> None:
    out = P.parse_caller(P.format_call("get_weather", arguments))
    assert (out.tool, out.arguments, out.error) == ("get_weather", arguments, None)
    assert out.text == P.format_call("get_weather", arguments)


def test_summary_round_trip_strips_echoed_prefix() -> None:
    assert P.parse_summarizer("conclusion: It is 21 degrees.").answer == "It is 21 degrees."


def test_message_and_toolspec_dicts_round_trip() -> None:
    for m in HISTORY:
        assert Message.from_dict(m.to_dict()) == m
    for t in TOOLS:
        assert ToolSpec.from_dict(t.to_dict()) == t
    assert ToolSpec.from_dict({"type": "function", "function": TOOLS[0].to_dict()}) == TOOLS[0]


# ----------------------------------------------------------------------------------------------- parse failures


@pytest.mark.parametrize(
    ("text", "decision", "error"),
    [
        ("", None, ParseError.EMPTY),
        ("   \n ", None, ParseError.EMPTY),
        ("\x00\xff garbage ###", None, ParseError.NO_DECISION),
        ("I think we should call the weather tool", None, ParseError.NO_DECISION),
        ("Thought. Next: summarizer.", Decision.CONCLUSION, None),
        ("thought next : CALLER", Decision.CALL, None),
        ("Stop. Next: give  up. Next: caller.", Decision.GIVE_UP, None),
        ("Call it. Next: caller. then Next: give up.", Decision.CALL, None),
    ],
)
def test_planner_parse(text: str, decision: Decision | None, error: ParseError | None) -> None:
    out = P.parse_planner(text)
    assert (out.decision, out.error) == (decision, error)


def test_planner_keeps_text_only_up_to_the_first_decision() -> None:
    out = P.parse_planner("Look it up.\n Next: caller.\nAction: get_weather")
    assert out.text == "Look it up.\n Next: caller."


@pytest.mark.parametrize(
    ("text", "tool", "error"),
    [
        ("", None, ParseError.EMPTY),
        ("I will call something", None, ParseError.NO_ACTION),
        ("Action:\nAction Input: {}", None, ParseError.NO_ACTION),
        ("Action: get_weather", "get_weather", ParseError.NO_ACTION_INPUT),
        ("Action: get_weather\nAction Input: {\"city\": \"Par", "get_weather", ParseError.BAD_JSON),
        ("Action: get_weather\nAction Input: city=Paris", "get_weather", ParseError.BAD_JSON),
        ("Action: get_weather\nAction Input:", "get_weather", ParseError.BAD_JSON),
        ("Action: get_weather\nAction Input: [1, 2]", "get_weather", ParseError.NOT_OBJECT),
        ("Action: get_weather\nAction Input: \"Paris\"", "get_weather", ParseError.NOT_OBJECT),
        ("Action: get_weather\nAction Input: {'city': 'Paris'}", "get_weather", ParseError.BAD_JSON),
    ],
)
def test_caller_parse_failures(text: str, tool: str | None, error: ParseError) -> None:
    out = P.parse_caller(text)
    assert (out.tool, out.arguments, out.error) == (tool, None, error)


def test_caller_last_action_and_input_win_and_trailing_text_is_ignored() -> None:
    text = 'Action: list_cities\nAction Input: {}\nAction: `get_weather`\nAction Input: {"city": "Rome"} trailing words'
    out = P.parse_caller(text)
    assert (out.tool, out.arguments, out.error) == ("get_weather", {"city": "Rome"}, None)


def test_summary_parse_failure_is_typed() -> None:
    assert P.parse_summarizer("conclusion:   ").error is ParseError.EMPTY


def test_parsers_survive_huge_outputs() -> None:
    huge = "word " * 200_000
    assert P.parse_planner(huge).error is ParseError.NO_DECISION
    assert P.parse_caller(huge + "Action: x\nAction Input: {").error is ParseError.BAD_JSON


# --------------------------------------------------------------------------- against the reference's own sample


def _tools(sample: dict) -> list[ToolSpec]:
    return tools_from_toolbench(sample["tools"])


def _history(sample: dict) -> list[Message]:
    return messages_from_alpha_umi(sample["history"])


def test_compat_mode_reproduces_the_reference_prompts() -> None:
    planner, caller, summarizer = (reference(f"train_{r}.json") for r in ("planner", "caller", "summarizer"))
    for s in planner:
        assert P.render_planner(_tools(s), _history(s), compat=True, description_chars=10**6) == s["input"]
    for s in caller:
        history = _history(s)
        assert P.render_caller(_tools(s), history, history[-1].content, compat=True, description_chars=10**6) == s["input"]
    for s in summarizer:
        assert P.render_summarizer(_history(s), compat=True) == s["input"]


def test_reference_targets_parse_and_round_trip() -> None:
    for s in reference("train_planner.json"):
        out = P.parse_planner(s["target"])
        assert out.error is None and out.text == s["target"]
    for s in reference("train_caller.json"):
        out = P.parse_caller(s["target"])
        assert out.error is None and out.text == s["target"]
