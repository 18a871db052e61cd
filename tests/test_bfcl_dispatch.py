"""umiq's BFCL dispatch agrees with BFCL's own executor and checker on every ground-truth trajectory."""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call

from workers.tools import bfcl
from workers.tools.registry import Observation, StateCache, execute, get_toolset, specs_for


def _all_types(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["type"]] if isinstance(node.get("type"), str) else []
        return own + [t for v in node.values() for t in _all_types(v)]
    if isinstance(node, list):
        return [t for v in node for t in _all_types(v)]
    return []


def test_specs_match_the_environment_methods_and_are_json_schema() -> None:
    seen: dict[str, str] = {}
    for class_name in bfcl.BFCL_CLASSES:
        toolset = get_toolset(class_name)
        instance = toolset.create({})
        methods = {n for n, _ in inspect.getmembers(instance, inspect.ismethod) if not n.startswith("_")}
        names = [s.name for s in toolset.specs()]
        assert set(names) == methods, class_name
        for name in names:
            assert seen.setdefault(name, class_name) == class_name, f"{name} in {seen[name]} and {class_name}"
        types = {t for s in toolset.specs() for t in _all_types(s.parameters)}
        assert types <= {"object", "string", "number", "integer", "boolean", "array"}, class_name
        assert all(s.description for s in toolset.specs())
    assert len(specs_for(list(bfcl.BFCL_CLASSES))) == len(seen)


@pytest.mark.parametrize("category", bfcl.MULTI_TURN_CATEGORIES)
def test_entries_and_tasks_of_every_category(category: str) -> None:
    entries = bfcl.load_entries(category)
    assert len(entries) == 200
    for entry in entries:
        task = bfcl.entry_task(entry)
        assert len(task["turns"]) == len(entry["ground_truth"]) and all(task["turns"])
        assert set(task["initial_config"]) == set(task["toolsets"]) == set(entry["involved_classes"])
        assert task["category"] == category and task["bfcl_id"] == entry["id"]
        long_context = [s.get(bfcl.LONG_CONTEXT_KEY, False) for s in task["initial_config"].values()]
        assert all(long_context) if category == "multi_turn_long_context" else not any(long_context)
        assert bool(task["missed_function"]) == (category == "multi_turn_miss_func")
        for turn in entry["ground_truth"]:
            for text in turn:
                name, arguments = bfcl.parse_python_call(text)
                assert bfcl.parse_python_call(bfcl.format_python_call(name, arguments)) == (name, arguments)


def test_missed_functions_stay_hidden_until_their_turn() -> None:
    entry = bfcl.load_entries("multi_turn_miss_func")[0]
    task = bfcl.entry_task(entry)
    assert task["missed_function"] == {3: ["sort"]}
    assert task["turns"][3] == "I have updated some more functions you can choose from. What about now?"
    assert [bfcl.hidden_tools(task, t) for t in range(5)] == [frozenset({"sort"})] * 3 + [frozenset()] * 2
    shown = {s.name for s in specs_for(task["toolsets"], hidden=bfcl.hidden_tools(task, 0))}
    assert "sort" not in shown and "cd" in shown
    observation = execute(task["toolsets"], task["initial_config"], [], "sort", {"file_name": "x"}, max_chars=100, hidden={"sort"})
    assert observation.hallucinated


def test_ground_truth_calls_hidden_tools_only_in_one_known_entry() -> None:
    """BFCL's miss_func_49 calls ``tail`` in turn 1 though it is withheld until turn 3; umiq would call that
    hallucinated (the model was not shown it), BFCL's executor runs it. Every other entry respects the hiding."""
    early = []
    for entry in bfcl.load_entries("multi_turn_miss_func"):
        task = bfcl.entry_task(entry)
        for turn, calls in enumerate(bfcl.ground_truth_calls(entry)):
            early += [(entry["id"], turn, name) for name, _ in calls if name in bfcl.hidden_tools(task, turn)]
    assert early == [("multi_turn_miss_func_49", 1, "tail")]


@pytest.mark.parametrize(
    "text",
    ["os.system('ls')", "cd(folder=open('x'))", "cd(**{'folder': 'a'})", "1 + 2", "cd(folder=x)", "cd(", "unknown_fn('a')"],
)
def test_parse_python_call_refuses_anything_but_a_literal_call(text: str) -> None:
    with pytest.raises(ValueError):
        bfcl.parse_python_call(text)


def _reference_value(reference: str) -> Any:
    """The package's printed result parsed back and serialized the way umiq does (JSON, ``default=str``).

    The package prints dicts as JSON and anything else with str(); repr() leaves ``mpf('1.3027')`` and
    ``Ellipsis`` (long-context data holds literal ``...``) in the text, which are spelled back as literals here.
    """
    try:
        return json.loads(reference)
    except json.JSONDecodeError:
        text = re.sub(r"\bEllipsis\b", "...", re.sub(r"mpf\('([^']*)'\)", r"'\1'", reference))
        return json.loads(json.dumps(ast.literal_eval(text), default=str))


def _close(ours: Any, expected: Any) -> bool:
    """Equal, except mpmath numbers: umiq prints them with str() at the precision the tool set, the package with
    repr(), which adds digits."""
    if isinstance(ours, dict) and isinstance(expected, dict):
        return ours.keys() == expected.keys() and all(_close(v, expected[k]) for k, v in ours.items())
    if ours == expected:
        return True
    if not (isinstance(ours, str) and isinstance(expected, str)):
        return False
    try:
        return math.isclose(float(ours), float(expected), rel_tol=0.05)
    except ValueError:
        return False


def _same_as_package(observation: Observation, reference: str) -> bool:
    if observation.error is not None:
        return reference == f"Error during execution: {observation.error.split(': ', 1)[1]}"
    value = json.loads(observation.content)
    return value == reference if isinstance(value, str) else _close(value, _reference_value(reference))


def _package_outputs(entry: dict[str, Any], long_context: bool) -> list[list[str]]:
    model_name = f"reference_{uuid.uuid4().hex}"
    try:
        return [
            execute_multi_turn_func_call(
                turn, entry["initial_config"], entry["involved_classes"], model_name, entry["id"], long_context=long_context
            )[0]
            for turn in entry["ground_truth"]
        ]
    finally:
        for key in [k for k in vars(multi_turn_utils) if k.startswith(model_name)]:
            delattr(multi_turn_utils, key)


def _umiq_outputs(entry: dict[str, Any], cache: StateCache) -> tuple[list[list[Observation]], list[tuple[str, dict]]]:
    task = bfcl.entry_task(entry)
    past: list[tuple[str, dict]] = []
    per_turn = []
    for turn in bfcl.ground_truth_calls(entry):
        observations = []
        for name, arguments in turn:
            observations.append(
                execute(task["toolsets"], task["initial_config"], past, name, arguments, max_chars=10**9, cache=cache)
            )
            past.append((name, arguments))
        per_turn.append(observations)
    return per_turn, past


def _agrees_with_the_package(entry: dict[str, Any], long_context: bool) -> None:
    ours, past = _umiq_outputs(entry, StateCache())
    references = _package_outputs(entry, long_context)
    assert [len(turn) for turn in ours] == [len(turn) for turn in references]
    flat = [o for turn in ours for o in turn]
    for observation, reference in zip(flat, (r for t in references for r in t)):
        assert _same_as_package(observation, reference), (entry["id"], observation, reference)
    assert not any(o.hallucinated for o in flat)
    task = bfcl.entry_task(entry)
    turn_ends = {sum(len(t) for t in ours[: i + 1]) - 1 for i in range(len(ours))} - {-1}
    for end in sorted(turn_ends):
        cold = execute(task["toolsets"], task["initial_config"], past[:end], *past[end], max_chars=10**9, cache=StateCache())
        assert cold == flat[end], (entry["id"], end)
    verdict = bfcl.check_entry(entry, bfcl.ground_truth_calls(entry))
    assert verdict == {"valid": True, "error_type": None, "details": None}, entry["id"]


@pytest.mark.parametrize("category", bfcl.MULTI_TURN_CATEGORIES)
def test_every_entry_matches_the_package_executor_and_passes_its_checker(category: str) -> None:
    globals_before = set(vars(multi_turn_utils))
    for entry in bfcl.load_entries(category):
        _agrees_with_the_package(entry, long_context=category == "multi_turn_long_context")
    assert set(vars(multi_turn_utils)) == globals_before


def test_checker_rejects_incomplete_trajectories() -> None:
    entry = bfcl.load_entries("multi_turn_base")[0]
    calls = bfcl.ground_truth_calls(entry)
    missing_last = bfcl.check_entry(entry, [*calls[:-1], calls[-1][:-1]])
    assert not missing_last["valid"] and missing_last["error_type"].startswith("multi_turn:")
    json.dumps(missing_last["details"])
    assert bfcl.check_entry(entry, calls[:-1])["error_type"] == "multi_turn:force_terminated"
    assert bfcl.check_entry(entry, [*calls[:-1], []])["error_type"] == "multi_turn:empty_turn_model_response"


def test_checker_never_evaluates_model_text(tmp_path: Path) -> None:
    entry = bfcl.load_entries("multi_turn_base")[0]
    calls = bfcl.ground_truth_calls(entry)
    target = tmp_path / "created_by_eval"
    hostile = [
        ("open", {"file": str(target), "mode": "w"}),
        ("cd", {"folder": "document') or open('" + str(target) + "', 'w') or ('"}),
        ("cd", {"folder=open(" + repr(str(target)) + ", 'w'), x": "a"}),
    ]
    verdict = bfcl.check_entry(entry, [[*hostile, *calls[0]], *calls[1:]])
    assert not target.exists()
    assert verdict["valid"] is True
