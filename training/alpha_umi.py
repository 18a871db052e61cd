"""The α-UMi reference layout: import and export trajectories and GLPFT samples as the reference repository has them.

Trajectories (``raw_data_stage_2.json``): a list of ``{"tools", "instruction", "conversations"}``, where ``tools``
is a list of ToolBench API docs (``Name``, ``function``, ``input``: parameter -> ``"type, description"``) and
``conversations`` a list of ``{"from", "value"}`` with ``from`` in user / assistant / caller / observation /
conclusion. Either field may also be the Python ``repr`` of that list, as some of the reference's dumps have it.
Samples (``train_{backbone,planner,caller,summarizer}.json``): ``{"tools", "history", "input", "target"}``.
Reading and writing this layout lets umiq train on the reference's data, and the reference's scripts (and released
checkpoints' users) read umiq's.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.protocol import Message, Speaker, ToolSpec, parse_caller, render_tool_docs
from training.samples import Sample, Trajectory

__all__ = [
    "SOURCE",
    "HALLUCINATION_MARKER",
    "tools_from_toolbench",
    "tools_to_toolbench",
    "messages_from_alpha_umi",
    "load_alpha_umi_trajectories",
    "export_alpha_umi",
    "export_samples",
]

SOURCE = "alpha_umi"
"""``Trajectory.source`` of trajectories read from the reference layout."""

HALLUCINATION_MARKER = "invalid_hallucination_function_name"
"""The tool name ToolBench writes in place of a hallucinated one; the reference drops such calls the same way."""

_ID_KEY = "id"
"""Optional key umiq adds to an exported trajectory so a task id (the split's key) survives a round trip."""


def _literal(raw: Any) -> Any:
    """A field that is either the value itself or its JSON / Python ``repr`` text."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return ast.literal_eval(raw)


def _toolbench_parameters(inputs: Mapping[str, str]) -> dict[str, Any]:
    properties = {}
    for name, text in inputs.items():
        kind, _, description = str(text).partition(", ")
        properties[name] = {"type": kind, "description": description}
    return {"type": "object", "properties": properties}


def tools_from_toolbench(raw: str | Sequence[Mapping[str, Any]]) -> list[ToolSpec]:
    """ToolBench API docs (a list, or its ``repr``) as tool specs; ``"type, description"`` split at the first comma.

    The one importer of the reference's tool docs: rendering them back in compat mode gives the reference's text.
    """
    return [
        ToolSpec(str(doc["Name"]), str(doc.get("function", "")), _toolbench_parameters(doc.get("input") or {}))
        for doc in _literal(raw)
    ]


def tools_to_toolbench(tools: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    """Tool specs as ToolBench API docs: the protocol's compat documentation, descriptions left whole."""
    docs = render_tool_docs(list(tools), compat=True, description_chars=2**62)
    return [json.loads(line) for line in docs.splitlines()]


def messages_from_alpha_umi(raw: str | Sequence[Mapping[str, str]]) -> list[Message]:
    """A ``conversations`` or ``history`` field (a list of ``{"from", "value"}``, or its ``repr``) as messages."""
    return [Message.from_dict(m) for m in _literal(raw)]


def _hallucinated(tools: Sequence[ToolSpec], messages: Sequence[Message]) -> frozenset[int]:
    """Caller messages naming no tool of the trajectory (ToolBench's marker included, since it is no tool's name)."""
    names = {t.name for t in tools}
    return frozenset(
        i
        for i, m in enumerate(messages)
        if m.speaker is Speaker.CALLER and (tool := parse_caller(m.content).tool) is not None and tool not in names
    )


def _trajectory(record: Mapping[str, Any]) -> Trajectory:
    tools = tools_from_toolbench(record["tools"])
    messages = messages_from_alpha_umi(record["conversations"])
    return Trajectory(tools, messages, record.get(_ID_KEY), SOURCE, _hallucinated(tools, messages))


def load_alpha_umi_trajectories(path: str | Path) -> list[Trajectory]:
    """Every trajectory of a reference raw file (``raw_data_stage_2.json`` layout)."""
    return [_trajectory(record) for record in json.loads(Path(path).read_text(encoding="utf-8"))]


def _record(trajectory: Trajectory) -> dict[str, Any]:
    first_user = next((m.content for m in trajectory.messages if m.speaker is Speaker.USER), "")
    record: dict[str, Any] = {
        "tools": tools_to_toolbench(trajectory.tools),
        "instruction": first_user,
        "conversations": [m.to_dict() for m in trajectory.messages],
    }
    if trajectory.task_id is not None:
        record[_ID_KEY] = trajectory.task_id
    return record


def _write_json(records: list[dict[str, Any]], path: str | Path) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")


def export_alpha_umi(trajectories: Iterable[Trajectory], path: str | Path) -> None:
    """Write trajectories in the reference raw layout (``instruction`` is the first user message), plus ``id``."""
    _write_json([_record(t) for t in trajectories], path)


def export_samples(samples: Iterable[Sample], path: str | Path) -> None:
    """Write samples in the reference's ``train_<role>.json`` layout: ``tools``, ``history``, ``input``, ``target``."""
    records = [
        {
            "tools": tools_to_toolbench(s.tools),
            "history": [m.to_dict() for m in s.history],
            "input": s.input,
            "target": s.target,
        }
        for s in samples
    ]
    _write_json(records, path)
