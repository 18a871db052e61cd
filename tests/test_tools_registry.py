"""The tool registry and function tools: schemas from hints, errors as observations, and state rebuilt by replay."""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

import pytest

from orchestrator.protocol import ToolSpec
from workers.tools.python_tools import schema_of, tool
from workers.tools.registry import (
    Observation,
    StateCache,
    ToolNameConflict,
    UnknownToolSet,
    execute,
    get_toolset,
    known_toolsets,
    register_toolset,
    specs_for,
)


@tool(toolset="test_schema_demo")
def search(
    query: str,
    limit: int,
    score: float,
    exact: bool,
    tags: list[str],
    filters: dict[str, Any],
    mode: Literal["fast", "deep"],
    language: Optional[str],
    page: int = 1,
    region: str | None = None,
) -> dict[str, Any]:
    """Search the catalogue.

    Args:
        query: What to look for.
        limit (int): How many results at most.
    """
    return {"query": query, "limit": limit}


@tool(toolset="test_schema_demo")
def shout(text: str) -> str:
    """Repeat the text in capitals, many times."""
    return text.upper() * 100


class Notebook:
    """A stateful tool set: a dict of notes per trajectory, seeded from the configuration."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.created = 0

    def specs(self) -> list[ToolSpec]:
        return [ToolSpec(n) for n in ("write", "read", "count", "write_then_fail")]

    def create(self, config: dict[str, Any]) -> dict[str, Any]:
        self.created += 1
        notes = config.setdefault("notes", {})
        return notes

    def invoke(self, state: Any, tool: str, arguments: dict[str, Any]) -> Any:
        if tool == "write":
            state[arguments["key"]] = arguments["value"]
            return {"written": arguments["key"]}
        if tool == "read":
            return {"value": state.get(arguments["key"])}
        if tool == "count":
            return len(state)
        state[arguments["key"]] = "partial"
        raise RuntimeError("failed after writing")


NOTEBOOK = register_toolset(Notebook("test_notebook"))


def test_schema_from_hints_and_docstring() -> None:
    spec = get_toolset("test_schema_demo").specs()[0]
    assert spec.name == "search"
    assert spec.description == "Search the catalogue."
    props = spec.parameters["properties"]
    assert props["query"] == {"type": "string", "description": "What to look for."}
    assert props["limit"] == {"type": "integer", "description": "How many results at most."}
    assert props["score"] == {"type": "number"}
    assert props["exact"] == {"type": "boolean"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["filters"] == {"type": "object"}
    assert props["mode"] == {"type": "string", "enum": ["fast", "deep"]}
    assert props["language"] == {"type": "string"}
    assert props["page"] == {"type": "integer"}
    assert props["region"] == {"type": "string"}
    assert spec.parameters["required"] == ["query", "limit", "score", "exact", "tags", "filters", "mode"]


def test_unsupported_hints_are_refused_at_decoration() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    def with_set(x: set[int]) -> None:
        return None

    for func in (untyped, with_set):
        with pytest.raises(TypeError):
            schema_of(func)


def test_builtin_calculator_runs() -> None:
    assert "calculator" in known_toolsets()
    observation = execute(["calculator"], {}, [], "multiply", {"a": 6, "b": 7}, max_chars=100)
    assert observation == Observation(content="42", error=None, hallucinated=False)


def test_hallucinated_name_runs_nothing() -> None:
    observation = execute(["calculator"], {}, [], "subtract", {"a": 1, "b": 2}, max_chars=1024)
    assert observation.hallucinated and observation.error is None
    assert "subtract" in json.loads(observation.content)["error"]


def test_hidden_tool_counts_as_hallucinated() -> None:
    observation = execute(["calculator"], {}, [], "add", {"a": 1, "b": 2}, max_chars=1024, hidden={"add"})
    assert observation.hallucinated
    assert [s.name for s in specs_for(["calculator"], hidden={"add"})] == ["multiply", "divide"]


def test_tool_raising_becomes_an_error_observation() -> None:
    observation = execute(["calculator"], {}, [], "divide", {"a": 1, "b": 0}, max_chars=1024)
    assert observation.error == "ZeroDivisionError: division by zero"
    assert json.loads(observation.content) == {"error": observation.error}
    assert not observation.hallucinated


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"a": "1", "b": 2}, "must be of type number"),
        ({"a": True, "b": 2}, "must be of type number"),
        ({"a": 1, "b": 2, "c": 3}, "unexpected arguments ['c']"),
        ({"a": 1}, "missing required arguments ['b']"),
    ],
)
def test_wrong_arguments_become_type_errors(arguments: dict[str, Any], fragment: str) -> None:
    observation = execute(["calculator"], {}, [], "add", arguments, max_chars=1024)
    assert observation.error is not None and observation.error.startswith("TypeError: ")
    assert fragment in observation.error


def test_enum_and_item_types_are_checked() -> None:
    good = {"query": "q", "limit": 1, "score": 0.5, "exact": False, "tags": ["a"], "filters": {}, "mode": "fast", "language": None}
    assert execute(["test_schema_demo"], {}, [], "search", good, max_chars=1024).error is None
    bad_enum = execute(["test_schema_demo"], {}, [], "search", {**good, "mode": "slow"}, max_chars=1024)
    assert "must be one of" in (bad_enum.error or "")
    bad_item = execute(["test_schema_demo"], {}, [], "search", {**good, "tags": ["a", 3]}, max_chars=1024)
    assert "argument 'tags'[1] must be of type string" in (bad_item.error or "")


def test_output_is_json_and_truncated() -> None:
    observation = execute(["test_schema_demo"], {}, [], "shout", {"text": "ab"}, max_chars=50)
    assert len(observation.content) == 50 and observation.content.endswith("...")
    assert observation.content.startswith('"ABAB')
    short = execute(["test_schema_demo"], {}, [], "shout", {"text": ""}, max_chars=50)
    assert short.content == '""'


def _run_trajectory(calls: list[tuple[str, dict[str, Any]]], config: dict[str, Any], *, warm: bool) -> list[Observation]:
    cache = StateCache()
    observations = []
    for i, (name, arguments) in enumerate(calls):
        observations.append(
            execute(["test_notebook"], config, calls[:i], name, arguments, max_chars=1024, cache=cache if warm else StateCache())
        )
    assert len(cache) == (1 if warm else 0)
    return observations


def test_replay_gives_the_same_state_as_a_warm_cache() -> None:
    config = {"test_notebook": {"notes": {"seed": "s"}}}
    calls = [
        ("write", {"key": "a", "value": 1}),
        ("write_then_fail", {"key": "b"}),
        ("read", {"key": "a"}),
        ("read", {"key": "b"}),
        ("count", {}),
    ]
    before = NOTEBOOK.created
    warm = _run_trajectory(calls, config, warm=True)
    assert NOTEBOOK.created - before == 1
    cold = _run_trajectory(calls, config, warm=False)
    assert NOTEBOOK.created - before == 1 + len(calls)
    assert warm == cold
    assert [o.content for o in warm[2:]] == ['{"value": 1}', '{"value": "partial"}', "3"]
    assert warm[1].error == "RuntimeError: failed after writing"
    assert config == {"test_notebook": {"notes": {"seed": "s"}}}


def test_trajectories_sharing_a_cache_never_share_state() -> None:
    cache = StateCache()
    config = {"test_notebook": {}}
    first = [("write", {"key": "x", "value": 1})]
    second = [("write", {"key": "x", "value": 2})]
    for past, (name, arguments) in ((first[:0], first[0]), (second[:0], second[0])):
        execute(["test_notebook"], config, past, name, arguments, max_chars=100, cache=cache)
    read = ("read", {"key": "x"})
    assert execute(["test_notebook"], config, first, *read, max_chars=100, cache=cache).content == '{"value": 1}'
    assert execute(["test_notebook"], config, second, *read, max_chars=100, cache=cache).content == '{"value": 2}'
    again = execute(["test_notebook"], config, first, *read, max_chars=100, cache=cache)
    assert again.content == '{"value": 1}'


def test_arguments_are_not_aliased_into_state() -> None:
    cache = StateCache()
    value = ["mutable"]
    execute(["test_notebook"], {}, [], "write", {"key": "k", "value": value}, max_chars=100, cache=cache)
    value.append("changed by the caller")
    past = [("write", {"key": "k", "value": ["mutable"]})]
    assert execute(["test_notebook"], {}, past, "read", {"key": "k"}, max_chars=100, cache=cache).content == '{"value": ["mutable"]}'


def test_unknown_toolset_is_a_clear_error() -> None:
    with pytest.raises(UnknownToolSet) as info:
        get_toolset("no_such_toolset")
    assert "no_such_toolset" in str(info.value) and "calculator" in str(info.value)
    with pytest.raises(UnknownToolSet):
        execute(["no_such_toolset"], {}, [], "add", {}, max_chars=100)


def test_tool_name_conflicts_are_refused() -> None:
    register_toolset(Notebook("test_notebook_twin"))
    with pytest.raises(ToolNameConflict):
        specs_for(["test_notebook", "test_notebook_twin"])
    with pytest.raises(ValueError):
        register_toolset(Notebook("test_notebook"))
