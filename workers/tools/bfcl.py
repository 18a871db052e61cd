"""BFCL's eight executable multi-turn environments as umiq tool sets, its tasks as umiq tasks, its checker as judge.

Each environment class (``GorillaFileSystem``, ``MathAPI``, ``MessageAPI``, ``TwitterAPI`` - the posting API -,
``TicketAPI``, ``TradingBot``, ``TravelAPI``, ``VehicleControlAPI``) is one tool set named after the class. Its state
is an instance built the way BFCL's own executor builds it (``execute_multi_turn_func_call``): the class is
instantiated and, unless stateless (``MathAPI``), ``_load_scenario(deep copy of initial_config[class],
long_context=...)`` is called. The long-context flag, which BFCL derives from the category in the test id, travels
inside each class's configuration section under :data:`LONG_CONTEXT_KEY` (set by :func:`entry_task`) and is
removed before the scenario is loaded. A call is dispatched to the instance's public method of that name with
keyword arguments; model text is never evaluated. Ground-truth strings are read with :func:`parse_python_call`
(``ast`` only). Tool names are unique across the eight classes (a test guards this); should a future package
version add a shared name, the registry refuses the combination (``ToolNameConflict``) instead of letting the last
class win as BFCL's executor does.

Only side-effect-free parts of ``bfcl_eval`` are imported (its constants, environment modules and the multi-turn
checker): ``bfcl_eval.utils`` and ``bfcl_eval.constants.eval_config`` create folders inside site-packages on
import, so data files are read directly from the package's ``data`` folder instead of through its loaders.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import inspect
import json
import keyword
import uuid
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from orchestrator.protocol import ToolSpec
from workers.tools.registry import register_toolset

__all__ = [
    "BFCL_CLASSES",
    "MULTI_TURN_CATEGORIES",
    "LONG_CONTEXT_KEY",
    "BfclToolSet",
    "parse_python_call",
    "format_python_call",
    "load_entries",
    "entry_task",
    "hidden_tools",
    "ground_truth_calls",
    "check_entry",
]

BFCL_CLASSES = (
    "GorillaFileSystem",
    "MathAPI",
    "MessageAPI",
    "TwitterAPI",
    "TicketAPI",
    "TradingBot",
    "TravelAPI",
    "VehicleControlAPI",
)
"""The environment classes of BFCL's multi-turn categories, which are also umiq's tool set names."""

MULTI_TURN_CATEGORIES = (
    "multi_turn_base",
    "multi_turn_miss_func",
    "multi_turn_miss_param",
    "multi_turn_long_context",
)

LONG_CONTEXT_KEY = "long_context"
"""Key in a class's configuration section that asks for BFCL's long-context scenario (never a BFCL scenario key)."""

Call = tuple[str, dict[str, Any]]


@cache
def _backend() -> Any:
    return importlib.import_module("bfcl_eval.constants.executable_backend_config")


@cache
def _data_dir() -> Path:
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("bfcl_eval is not installed (pip install --no-deps bfcl-eval)")
    return Path(spec.origin).parent / "data"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _openapi_schema(node: Any, types: Mapping[str, str]) -> Any:
    """BFCL's Python-flavoured types (``dict``, ``float``, ``tuple``...) mapped to JSON schema ones, recursively."""
    if isinstance(node, list):
        return [_openapi_schema(v, types) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "type" and isinstance(value, str):
            out[key] = types.get(value, value)
        elif key == "properties":
            out[key] = {name: _openapi_schema(prop, types) for name, prop in value.items()}
        else:
            out[key] = _openapi_schema(value, types)
    return out


@cache
def _specs(class_name: str) -> tuple[ToolSpec, ...]:
    types = importlib.import_module("bfcl_eval.constants.type_mappings").GORILLA_TO_OPENAPI
    path = _data_dir() / "multi_turn_func_doc" / _backend().MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    return tuple(
        ToolSpec(name=doc["name"], description=doc.get("description", ""), parameters=_openapi_schema(doc["parameters"], types))
        for doc in _read_jsonl(path)
    )


@cache
def _env_class(class_name: str) -> type:
    module = importlib.import_module(_backend().CLASS_FILE_PATH_MAPPING[class_name])
    return getattr(module, class_name)


@cache
def _tool_names(class_name: str) -> frozenset[str]:
    """The public methods of the class that are also documented: the only attributes a call may reach."""
    methods = {n for n, _ in inspect.getmembers(_env_class(class_name), inspect.isfunction) if not n.startswith("_")}
    return frozenset(methods & {s.name for s in _specs(class_name)})


class BfclToolSet:
    """One BFCL environment class as a tool set; its per-trajectory state is an instance of the class."""

    def __init__(self, class_name: str) -> None:
        self.name = class_name

    def specs(self) -> list[ToolSpec]:
        return list(_specs(self.name))

    def create(self, config: dict[str, Any]) -> object:
        instance = _env_class(self.name)()
        if self.name not in _backend().STATELESS_CLASSES:
            scenario = dict(config)
            long_context = bool(scenario.pop(LONG_CONTEXT_KEY, False))
            instance._load_scenario(scenario, long_context=long_context)
        return instance

    def invoke(self, state: object, tool: str, arguments: dict[str, Any]) -> Any:
        if tool not in _tool_names(self.name):
            raise KeyError(f"{tool!r} is not a tool of {self.name!r}")
        return getattr(state, tool)(**arguments)


for _class_name in BFCL_CLASSES:
    register_toolset(BfclToolSet(_class_name))


# ------------------------------------------------------------------------------------------------ call strings


@cache
def _parameter_names(function: str) -> tuple[str, ...]:
    """Parameter names of a BFCL method, in order: BFCL's ground truth passes some arguments by position."""
    for class_name in BFCL_CLASSES:
        if function in _tool_names(class_name):
            parameters = inspect.signature(getattr(_env_class(class_name), function)).parameters.values()
            return tuple(p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)
    raise ValueError(f"{function!r} is no BFCL function, so its positional arguments cannot be named")


def _literal(node: ast.expr, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError) as exc:  # TypeError: an unhashable key such as {[1]: 2}
        raise ValueError(f"argument is not a literal in {text!r}") from exc


def parse_python_call(text: str) -> Call:
    """``"cd(folder='document')"`` -> ``("cd", {"folder": "document"})``, read with ``ast``, never evaluated.

    Positional arguments (BFCL's ground truth has a few, e.g. ``sort('final_report.pdf')``) are named from the BFCL
    method's signature. Anything but one call of a plain name with literal arguments is a ValueError.
    """
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"not a Python call: {text!r}") from exc
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a call of a plain function name: {text!r}")
    name = node.func.id
    arguments: dict[str, Any] = {}
    if node.args:
        names = _parameter_names(name)
        if len(node.args) > len(names):
            raise ValueError(f"too many positional arguments in {text!r}")
        arguments.update(zip(names, (_literal(a, text) for a in node.args)))
    for kw in node.keywords:
        if kw.arg is None or kw.arg in arguments:
            raise ValueError(f"unsupported or repeated keyword argument in {text!r}")
        arguments[kw.arg] = _literal(kw.value, text)
    return name, arguments


def _is_literal(value: Any) -> bool:
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, TypeError, RecursionError):
        return False


def format_python_call(name: str, arguments: Mapping[str, Any]) -> str:
    """The BFCL string form of a call, ``name(k=repr(v), ...)``; the inverse of :func:`parse_python_call`."""
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def _safe_call_string(name: str, arguments: Mapping[str, Any], allowed: frozenset[str]) -> str | None:
    """The call as a string BFCL's checker may ``eval``, or None when it is anything but a method with literals.

    The package's checker evaluates call strings; these come from the model, so only names of the entry's methods,
    identifier keywords and values whose ``repr`` is a literal get through. Every call left out is one BFCL would
    have failed to run anyway (unknown name, unparsable value), so the verdict is the same without the risk.
    """
    keys_ok = all(isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k) for k in arguments)
    if name not in allowed or not keys_ok or not all(_is_literal(v) for v in arguments.values()):
        return None
    return format_python_call(name, arguments)


# ------------------------------------------------------------------------------------------------ tasks


def _category(entry_id: str) -> str:
    return entry_id.rsplit("_", 1)[0]


def load_entries(category: str = "multi_turn_base") -> list[dict[str, Any]]:
    """A multi-turn category's entries, each with its per-turn ``ground_truth`` call strings merged in.

    Entries keep BFCL's fields (``id``, ``question``, ``initial_config``, ``involved_classes``, ``path``, and for
    the miss-function category ``missed_function``: turn index -> function names withheld until that turn).
    """
    if category not in MULTI_TURN_CATEGORIES:
        raise ValueError(f"unknown BFCL multi-turn category {category!r}; choose one of {', '.join(MULTI_TURN_CATEGORIES)}")
    prefix = importlib.import_module("bfcl_eval.constants.category_mapping").VERSION_PREFIX
    questions = _read_jsonl(_data_dir() / f"{prefix}_{category}.json")
    answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(_data_dir() / "possible_answer" / f"{prefix}_{category}.json")}
    return [{**q, "ground_truth": answers[q["id"]]} for q in questions]


def _turn_text(messages: Sequence[Mapping[str, str]], revealed: bool) -> str:
    text = "\n".join(m["content"] for m in messages if m.get("role") == "user")
    if not text and revealed:
        return importlib.import_module("bfcl_eval.constants.default_prompts").DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC
    return text


def entry_task(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The umiq task of a BFCL entry: user text per turn, tool sets, and their initial configuration.

    ``initial_config`` has one section per involved class (sections of classes the entry does not involve are
    dropped), with :data:`LONG_CONTEXT_KEY` set in each for the long-context category. A miss-function turn has no
    user message in BFCL; like BFCL's inference loop, its text is the package's "I have updated some more
    functions" prompt. ``missed_function`` maps a turn index to the tools withheld before it (see
    :func:`hidden_tools`).
    """
    category = _category(entry["id"])
    long_context = "long_context" in category or "composite" in category
    config = {}
    for class_name in entry["involved_classes"]:
        section = copy.deepcopy(dict(entry["initial_config"].get(class_name, {})))
        if long_context:
            section[LONG_CONTEXT_KEY] = True
        config[class_name] = section
    missed = {int(turn): list(names) for turn, names in entry.get("missed_function", {}).items()}
    return {
        "turns": [_turn_text(messages, i in missed) for i, messages in enumerate(entry["question"])],
        "toolsets": list(entry["involved_classes"]),
        "initial_config": config,
        "bfcl_id": entry["id"],
        "category": category,
        "missed_function": missed,
    }


def hidden_tools(task: Mapping[str, Any], turn: int) -> frozenset[str]:
    """Tools whose documentation the model must not see yet in ``turn`` (BFCL's miss-function category)."""
    missed: Mapping[int, Sequence[str]] = task.get("missed_function", {})
    return frozenset(name for at, names in missed.items() if int(at) > turn for name in names)


def ground_truth_calls(entry: Mapping[str, Any]) -> list[list[Call]]:
    """The entry's ground truth as (name, keyword arguments) per call per turn."""
    return [[parse_python_call(c) for c in turn] for turn in entry["ground_truth"]]


# ------------------------------------------------------------------------------------------------ judging


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _forget_instances(model_name: str) -> None:
    """BFCL's executor keeps environment instances in its module globals, keyed by model name and test id."""
    namespace = vars(importlib.import_module("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils"))
    for key in [k for k in namespace if k.startswith(model_name)]:
        del namespace[key]


def check_entry(entry: Mapping[str, Any], calls_per_turn: Sequence[Sequence[Call]]) -> dict[str, Any]:
    """BFCL's multi-turn verdict (state and response checks after every turn) on one trajectory's calls.

    ``calls_per_turn`` holds the calls that ran, per user turn. Each call is one step, as in α-UMi. The package's
    checker runs under a fresh model name that is removed afterwards, so checks never share environment state.
    """
    turns = entry["ground_truth"]
    if len(calls_per_turn) != len(turns):
        message = f"trajectory has {len(calls_per_turn)} turns, the entry {len(turns)}"
        return {"valid": False, "error_type": "multi_turn:force_terminated", "details": {"error_message": message}}
    allowed = frozenset().union(*(_tool_names(c) for c in entry["involved_classes"]))
    decoded = [
        [[s] for name, arguments in turn if (s := _safe_call_string(name, arguments, allowed)) is not None]
        for turn in calls_per_turn
    ]
    checker = importlib.import_module("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")
    model_name = f"umiq_{uuid.uuid4().hex}"
    test_entry = {k: entry[k] for k in ("id", "initial_config", "involved_classes")}
    try:
        result = checker.multi_turn_checker(decoded, turns, test_entry, _category(entry["id"]), model_name)
    finally:
        _forget_instances(model_name)
    if result.get("valid"):
        return {"valid": True, "error_type": None, "details": None}
    details = {k: v for k, v in result.items() if k not in ("valid", "error_type")}
    return {"valid": False, "error_type": result.get("error_type"), "details": _json_safe(details)}
