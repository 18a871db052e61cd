"""Properties that must hold for any input: parsers never raise and read back what the formatters write, the tool
dispatcher turns any arguments into an observation, and BFCL call strings are read, never evaluated.

Example counts stay modest (CI has two cores); no example database is written (``database=None``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from orchestrator import protocol
from orchestrator.protocol import BackboneOutput, CallerOutput, Decision, ParseError, PlannerOutput, SummaryOutput
from workers.tools import bfcl
from workers.tools.registry import Observation, StateCache, execute, get_toolset

__all__: list[str] = []

PARSERS = settings(max_examples=300, deadline=None, database=None)
TOOLS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MAX_CHARS = 256

# --------------------------------------------------------------------------------------------------- strategies

FRAGMENTS = [
    "Next:", "Next :", "next: ", "caller", "conclusion", "give up", "giveup", "summarizer", ".", "Action:",
    "Action Input:", "action:", "conclusion:", "Conclusion :", "{", "}", "[", "]", '"', "'", ":", ",", "\n", " ",
    "\t", "null", "1", "-2.5e3", "true", "tool_x", '{"a": 1}', "\\", "</s>", "é", "\x00",
]
model_text = st.one_of(st.text(), st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=30).map("".join))
"""Arbitrary text, and text made of the protocol's own markers, which reaches the parsers' deeper branches."""

no_action = st.text().filter(lambda s: "Action" not in s)
json_scalars = st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(-1e6, 1e6, allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8
)
plain_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | no_action,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(no_action, inner, max_size=3),
    max_leaves=10,
)
"""JSON values whose strings hold no ``Action``: the caller parser takes the *last* ``Action:`` of a text, so an
argument quoting one is read as the call (a documented choice, made for models that repeat themselves)."""
tool_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)


def no_markers(text: str) -> bool:
    """Text a parser finds no decision in, so it can serve as a rationale or an answer."""
    return protocol.parse_planner(text).decision is None and protocol.parse_backbone(text).decision is None


# ------------------------------------------------------------------------------------------------ never raise


@PARSERS
@given(model_text)
def test_planner_parser_never_raises(text: str) -> None:
    out = protocol.parse_planner(text)
    assert isinstance(out, PlannerOutput)
    if out.decision is None:
        assert out.error in (ParseError.EMPTY, ParseError.NO_DECISION)
    else:
        assert out.error is None and out.text.endswith(".") and "Next: " in out.text


@PARSERS
@given(model_text)
def test_caller_parser_never_raises(text: str) -> None:
    out = protocol.parse_caller(text)
    assert isinstance(out, CallerOutput)
    if out.error is None:
        assert out.tool and isinstance(out.arguments, dict)
        assert out.text == protocol.format_call(out.tool, out.arguments)
    else:
        assert out.arguments is None


@PARSERS
@given(model_text)
def test_summarizer_parser_never_raises(text: str) -> None:
    out = protocol.parse_summarizer(text)
    assert isinstance(out, SummaryOutput)
    assert (out.error is None) == bool(out.answer) and out.answer == out.answer.strip()


@PARSERS
@given(model_text)
def test_backbone_parser_never_raises(text: str) -> None:
    out = protocol.parse_backbone(text)
    assert isinstance(out, BackboneOutput)
    assert (out.decision is Decision.CALL) == (out.call is not None)
    if out.decision is None:
        assert out.error in (ParseError.EMPTY, ParseError.NO_DECISION)


# ------------------------------------------------------------------------------------------------- round trips


@PARSERS
@given(st.text(), st.sampled_from(Decision))
def test_planner_reads_back_what_format_planner_writes(rationale: str, decision: Decision) -> None:
    assume(no_markers(rationale))
    text = protocol.format_planner(rationale, decision)
    assert protocol.parse_planner(text) == PlannerOutput(text=text, rationale=rationale.strip(), decision=decision)


@PARSERS
@given(tool_names, st.dictionaries(no_action, plain_json, max_size=5))
def test_caller_reads_back_what_format_call_writes(tool: str, arguments: dict[str, Any]) -> None:
    text = protocol.format_call(tool, arguments)
    assert protocol.parse_caller(text) == CallerOutput(text=text, tool=tool, arguments=arguments)


@PARSERS
@given(st.text(), st.text())
def test_summarizer_drops_one_echoed_conclusion_marker(answer: str, noise: str) -> None:
    assume(answer.strip())
    assert protocol.parse_summarizer(f"conclusion: {answer}").answer == answer.strip()
    assume(not re.match(r"\s*conclusion\s*:", noise, re.IGNORECASE) and noise.strip())
    assert protocol.parse_summarizer(noise) == SummaryOutput(answer=noise.strip())


@PARSERS
@given(st.text(), tool_names, st.dictionaries(no_action, plain_json, max_size=4))
def test_backbone_reads_back_a_call(rationale: str, tool: str, arguments: dict[str, Any]) -> None:
    assume(no_markers(rationale))
    out = protocol.parse_backbone(protocol.format_backbone_target(rationale, call=protocol.format_call(tool, arguments)))
    assert (out.decision, out.rationale, out.error) == (Decision.CALL, rationale.strip(), None)
    assert (out.call.tool, out.call.arguments) == (tool, arguments)


@PARSERS
@given(st.text(), st.text())
def test_backbone_reads_back_a_conclusion_or_a_give_up(rationale: str, answer: str) -> None:
    assume(no_markers(rationale) and no_markers(answer) and answer.strip())
    assume(not re.match(r"give\s*up\b", answer.strip(), re.IGNORECASE))
    out = protocol.parse_backbone(protocol.format_backbone_target(rationale, answer=answer))
    assert (out.decision, out.rationale, out.answer, out.error) == (Decision.CONCLUSION, rationale.strip(), answer.strip(), None)
    gave_up = protocol.parse_backbone(protocol.format_backbone_target(rationale))
    assert (gave_up.decision, gave_up.rationale, gave_up.error) == (Decision.GIVE_UP, rationale.strip(), None)


# ---------------------------------------------------------------------------------------------- tool dispatcher


@st.composite
def bfcl_calls(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """A BFCL tool set, one of its tools (or a made-up name), and arguments shaped like its schema or not at all."""
    toolset = draw(st.sampled_from(bfcl.BFCL_CLASSES))
    specs = {spec.name: spec for spec in get_toolset(toolset).specs()}
    tool = draw(st.sampled_from(sorted(specs)) | tool_names)
    names = sorted(specs[tool].parameters.get("properties", {})) if tool in specs else []
    schema_keys = st.dictionaries(st.sampled_from(names), json_values, max_size=len(names)) if names else st.just({})
    arguments = draw(schema_keys | st.dictionaries(st.text(max_size=8), json_values, max_size=4))
    return toolset, tool, arguments


@TOOLS
@given(bfcl_calls())
def test_any_bfcl_call_becomes_an_observation(call: tuple[str, str, dict[str, Any]]) -> None:
    toolset, tool, arguments = call
    known = {spec.name for spec in get_toolset(toolset).specs()}
    observation = execute([toolset], {toolset: {}}, [], tool, arguments, max_chars=MAX_CHARS, cache=StateCache(2))
    assert isinstance(observation, Observation)
    assert isinstance(observation.content, str) and len(observation.content) <= MAX_CHARS
    assert observation.hallucinated == (tool not in known)
    if observation.error is not None:
        assert re.match(r"\w+: ", observation.error) and not observation.hallucinated


numbers = st.integers(-(10**6), 10**6) | st.floats(allow_nan=False, allow_infinity=False)


@TOOLS
@given(
    st.sampled_from(["add", "multiply", "divide"]),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), numbers | json_values, max_size=3),
)
def test_calculator_checks_argument_types_before_running(tool: str, arguments: dict[str, Any]) -> None:
    observation = execute(["calculator"], {}, [], tool, arguments, max_chars=MAX_CHARS, cache=StateCache(2))
    assert isinstance(observation, Observation) and not observation.hallucinated
    well_typed = set(arguments) == {"a", "b"} and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in arguments.values()
    )
    if not well_typed:
        assert observation.error is not None and observation.error.startswith("TypeError: ")
        assert json.loads(observation.content) == {"error": observation.error}
    elif tool == "divide" and arguments["b"] == 0:
        assert observation.error.startswith("ZeroDivisionError")
    else:
        assert observation.error is None and isinstance(json.loads(observation.content), int | float)


# ---------------------------------------------------------------------------------------- BFCL call strings


def _hostile(path: Path) -> list[str]:
    """Strings that would create ``path`` if anything evaluated them."""
    target = repr(str(path))
    return [
        f"__import__('pathlib').Path({target}).touch()",
        f"open({target}, 'w').write('x')",
        f"open(file={target}, mode='w')",
        f"cd(folder=open({target}, 'w'))",
        f"cd(folder=__import__('os').system('touch ' + {target}))",
        f"cd(folder=(lambda: open({target}, 'w'))())",
        f"cd(folder=[open({target}, 'w') for _ in 'x'])",
        f"cd(folder={target}) or open({target}, 'w')",
        f"cd(**{{'folder': open({target}, 'w')}})",
        f"exec(\"open({target}, 'w')\")",
        f"eval(\"open({target}, 'w')\")",
        f"cd(folder=f'{{open({target}, \"w\")}}')",
        f"cd(folder='x'); open({target}, 'w')",
        f"import os; os.system('touch ' + {target})",
        f"mkdir(dir_name={target}.__class__.__mro__[1].__subclasses__())",
    ]


_SCALARS = (str, bytes, int, float, complex, bool, type(None), type(Ellipsis))


def _is_literal(value: Any) -> bool:
    """Plain data, as ``ast.literal_eval`` builds it: no object that evaluating code could have produced."""
    if isinstance(value, dict):
        return all(_is_literal(k) and _is_literal(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return all(_is_literal(v) for v in value)
    return type(value) in _SCALARS


def test_hostile_call_strings_are_never_evaluated(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    for text in _hostile(target):
        try:
            name, arguments = bfcl.parse_python_call(text)
        except ValueError:
            continue
        assert isinstance(name, str) and all(_is_literal(v) for v in arguments.values()), text
    assert not target.exists()


python_ish = st.lists(
    st.sampled_from(["cd", "open", "__import__", "(", ")", "=", "folder", "'x'", "1", ",", "[", "]", "{", "}", ":", ".",
                     "lambda", "**", "os", ";", " ", "'", '"', "-", "j", "None", "set()", "...", "f'{", "\\"])
    | st.text(max_size=3),
    max_size=24,
).map("".join)


@PARSERS
@given(st.one_of(st.text(), python_ish))
@example("cd(folder={(1, 2): [3]})")
def test_parse_python_call_reads_literals_or_refuses(text: str) -> None:
    try:
        name, arguments = bfcl.parse_python_call(text)
    except ValueError:
        return
    assert name.isidentifier() and all(_is_literal(v) for v in arguments.values())


def test_parse_python_call_refuses_an_unhashable_literal_with_a_value_error() -> None:
    with pytest.raises(ValueError):
        bfcl.parse_python_call("cd(folder={[1]: 2})")
