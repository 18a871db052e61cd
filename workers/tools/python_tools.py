"""Plain Python functions as tools: a decorator derives each tool's JSON schema from type hints and docstring.

``@tool(toolset="demo")`` adds the function to the stateless :class:`FunctionToolSet` named ``demo`` (created and
registered on first use). Arguments are checked against the derived schema before the call, so a model passing a
string where a number belongs gets a clear error observation instead of whatever Python happens to do with it.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from orchestrator.protocol import ToolSpec
from workers.tools.registry import register_toolset

__all__ = ["FunctionToolSet", "tool", "schema_of", "add", "multiply", "divide"]

F = TypeVar("F", bound=Callable[..., Any])

_SCALARS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}
_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters)\s*:\s*$")
_ARG_LINE = re.compile(r"^\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _optional_inner(hint: Any) -> Any | None:
    """``X`` for ``Optional[X]`` / ``X | None``; None when the hint is not an optional."""
    if get_origin(hint) in (Union, types.UnionType):
        members = [a for a in get_args(hint) if a is not type(None)]
        if len(members) == 1 and len(get_args(hint)) == 2:
            return members[0]
    return None


def _type_schema(hint: Any) -> dict[str, Any]:
    inner = _optional_inner(hint)
    if inner is not None:
        return _type_schema(inner)
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin = get_origin(hint)
    if hint is list or origin is list:
        args = get_args(hint)
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if hint is dict or origin is dict:
        return {"type": "object"}
    if origin is Literal:
        values = list(get_args(hint))
        kinds = {_SCALARS.get(type(v)) for v in values}
        if len(kinds) != 1 or None in kinds:
            raise TypeError(f"Literal values must share one JSON type: {values!r}")
        return {"type": kinds.pop(), "enum": values}
    raise TypeError(f"no JSON schema for type hint {hint!r}")


def _split_docstring(func: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The description (text before a Google-style ``Args:`` block) and each argument's line from that block."""
    lines = (inspect.getdoc(func) or "").splitlines()
    head = next((i for i, line in enumerate(lines) if _ARGS_HEADER.match(line)), len(lines))
    arguments: dict[str, str] = {}
    for line in lines[head + 1 :]:
        if line and not line[0].isspace():
            break
        match = _ARG_LINE.match(line)
        if match:
            arguments[match.group(1)] = match.group(2).strip()
    return "\n".join(lines[:head]).strip(), arguments


def schema_of(func: Callable[..., Any]) -> ToolSpec:
    """The tool documentation of ``func``: every parameter needs a supported type hint; defaults make it optional."""
    hints = get_type_hints(func, include_extras=False)
    description, argument_docs = _split_docstring(func)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, parameter in inspect.signature(func).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"{func.__name__}: *args/**kwargs cannot be described to a model")
        if name not in hints:
            raise TypeError(f"{func.__name__}: parameter {name!r} has no type hint")
        prop = _type_schema(hints[name])
        if name in argument_docs:
            prop["description"] = argument_docs[name]
        properties[name] = prop
        if parameter.default is parameter.empty and _optional_inner(hints[name]) is None:
            required.append(name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return ToolSpec(name=func.__name__, description=description, parameters=parameters)


def _type_error(schema: dict[str, Any], value: Any, where: str) -> str | None:
    kind = schema.get("type")
    is_bool = isinstance(value, bool)
    ok = {
        "boolean": is_bool,
        "integer": isinstance(value, int) and not is_bool,
        "number": isinstance(value, int | float) and not is_bool,
        "string": isinstance(value, str),
        "array": isinstance(value, list | tuple),
        "object": isinstance(value, dict),
    }.get(kind, True)
    if not ok:
        return f"{where} must be of type {kind}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']!r}, got {value!r}"
    if kind == "array" and "items" in schema:
        return next((e for i, v in enumerate(value) if (e := _type_error(schema["items"], v, f"{where}[{i}]"))), None)
    return None


def _check_arguments(spec: ToolSpec, arguments: dict[str, Any]) -> None:
    properties = spec.parameters["properties"]
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise TypeError(f"{spec.name}() got unexpected arguments {unknown}; it takes {sorted(properties)}")
    missing = [n for n in spec.parameters.get("required", []) if n not in arguments]
    if missing:
        raise TypeError(f"{spec.name}() is missing required arguments {missing}")
    for name, value in arguments.items():
        if value is None and name not in spec.parameters.get("required", []):
            continue
        error = _type_error(properties[name], value, f"argument {name!r}")
        if error:
            raise TypeError(f"{spec.name}(): {error}")


class FunctionToolSet:
    """A stateless tool set of plain functions; its state is None and every call is checked against its schema."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._functions: dict[str, tuple[Callable[..., Any], ToolSpec]] = {}

    def add(self, func: Callable[..., Any]) -> None:
        if func.__name__ in self._functions:
            raise ValueError(f"tool set {self.name!r} already has a tool named {func.__name__!r}")
        self._functions[func.__name__] = (func, schema_of(func))

    def specs(self) -> list[ToolSpec]:
        return [spec for _, spec in self._functions.values()]

    def create(self, config: dict[str, Any]) -> None:
        return None

    def invoke(self, state: object, tool: str, arguments: dict[str, Any]) -> Any:
        if tool not in self._functions:
            raise KeyError(f"{tool!r} is not a tool of {self.name!r}")
        func, spec = self._functions[tool]
        _check_arguments(spec, arguments)
        return func(**arguments)


_FUNCTION_TOOLSETS: dict[str, FunctionToolSet] = {}


def tool(*, toolset: str) -> Callable[[F], F]:
    """Register the decorated function as a tool of the function tool set ``toolset``; the function is unchanged."""

    def decorate(func: F) -> F:
        target = _FUNCTION_TOOLSETS.get(toolset)
        if target is None:
            target = _FUNCTION_TOOLSETS[toolset] = FunctionToolSet(toolset)
            register_toolset(target)
        target.add(func)
        return func

    return decorate


@tool(toolset="calculator")
def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


@tool(toolset="calculator")
def multiply(a: float, b: float) -> float:
    """Multiply two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a * b


@tool(toolset="calculator")
def divide(a: float, b: float) -> float:
    """Divide a by b; dividing by zero is an error.

    Args:
        a: The numerator.
        b: The denominator.
    """
    return a / b
