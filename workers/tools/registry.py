"""The registry of tool sets, and the one function the tool pool calls to turn a tool call into an observation.

Tool workers are stateless processes, so a trajectory's tool state (a BFCL file system, a trading account) is never
stored between calls: it is rebuilt from the trajectory's initial configuration by replaying the calls that already
ran, in order, then the new call runs. Replay is deterministic (the environments seed their own random generators),
so a state is fully named by (tool sets, configuration, calls so far). A small per-process LRU cache keyed by that
name keeps the common case (the next call of a trajectory landing on the same process) free of replay.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from orchestrator.protocol import ToolSpec

__all__ = [
    "ToolSet",
    "UnknownToolSet",
    "ToolNameConflict",
    "Observation",
    "StateCache",
    "register_toolset",
    "get_toolset",
    "known_toolsets",
    "specs_for",
    "execute",
]

log = structlog.get_logger(__name__)

_BUILTIN_MODULES = ("workers.tools.python_tools", "workers.tools.bfcl")
"""Modules whose import registers umiq's own tool sets; loaded on the first lookup, so no caller has to."""

Call = tuple[str, dict[str, Any]]


class ToolSet(Protocol):
    """A named group of tools sharing one per-trajectory state (a BFCL environment instance, or nothing at all).

    ``create`` receives this tool set's own section of the trajectory's configuration, already deep-copied, and
    returns fresh state; ``invoke`` runs one tool against that state with keyword arguments and may mutate it.
    """

    name: str

    def specs(self) -> list[ToolSpec]: ...

    def create(self, config: dict[str, Any]) -> object: ...

    def invoke(self, state: object, tool: str, arguments: dict[str, Any]) -> Any: ...


class UnknownToolSet(KeyError):
    """A task named a tool set no module registered: a configuration error, never a model error."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = list(known)
        super().__init__(f"unknown tool set {name!r}; known tool sets: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:
        return str(self.args[0])


class ToolNameConflict(ValueError):
    """Two tool sets used together expose the same tool name, so a call could not be routed unambiguously."""


@dataclass(frozen=True)
class Observation:
    """What the model sees after a call: JSON text cut to the caller's length, plus what went wrong, if anything.

    ``error`` is set when the tool ran and raised (its type and message, also in ``content`` for the model);
    ``hallucinated`` when the name is not a tool of the trajectory, in which case nothing ran and ``error`` is None.
    """

    content: str
    error: str | None = None
    hallucinated: bool = False


_REGISTRY: dict[str, ToolSet] = {}
_REGISTRY_LOCK = threading.Lock()
_builtins_loaded = False


def register_toolset(toolset: ToolSet, *, replace: bool = False) -> ToolSet:
    """Make a tool set reachable by name; registering a different object under a taken name is refused."""
    with _REGISTRY_LOCK:
        current = _REGISTRY.get(toolset.name)
        if current is not None and current is not toolset and not replace:
            raise ValueError(f"tool set {toolset.name!r} is already registered")
        _REGISTRY[toolset.name] = toolset
    return toolset


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def known_toolsets() -> list[str]:
    """Every registered tool set name, sorted, umiq's built-in ones included."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_toolset(name: str) -> ToolSet:
    """The tool set registered under ``name``; a clear error naming the known ones otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownToolSet(name, known_toolsets()) from None


def _routes(toolsets: Sequence[ToolSet]) -> dict[str, ToolSet]:
    routes: dict[str, ToolSet] = {}
    for toolset in toolsets:
        for spec in toolset.specs():
            other = routes.setdefault(spec.name, toolset)
            if other is not toolset:
                raise ToolNameConflict(f"tool {spec.name!r} is in both {other.name!r} and {toolset.name!r}")
    return routes


def specs_for(names: Sequence[str], *, hidden: Collection[str] = ()) -> list[ToolSpec]:
    """The documentation of every tool of the named tool sets, in order, minus the ``hidden`` tool names.

    Raises :class:`ToolNameConflict` when two of the tool sets share a tool name: umiq refuses to guess a route
    (BFCL's own executor silently lets the last class win).
    """
    toolsets = [get_toolset(n) for n in names]
    _routes(toolsets)
    return [spec for toolset in toolsets for spec in toolset.specs() if spec.name not in hidden]


class StateCache:
    """A per-process LRU of rebuilt tool states, keyed by the digest of (tool sets, configuration, calls so far).

    A state is *taken* out of the cache before it is used and put back under its new key afterwards, so one state
    object is never reachable from two keys and two trajectories can never mutate the same object.
    """

    def __init__(self, maxsize: int = 32) -> None:
        self.maxsize = maxsize
        self._states: OrderedDict[str, dict[str, object]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> dict[str, object] | None:
        with self._lock:
            return self._states.pop(key, None)

    def put(self, key: str, state: dict[str, object]) -> None:
        with self._lock:
            self._states[key] = state
            self._states.move_to_end(key)
            while len(self._states) > self.maxsize:
                self._states.popitem(last=False)

    def __len__(self) -> int:
        return len(self._states)


_CACHE = StateCache()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr).encode()


def _state_hasher(names: Sequence[str], config: Mapping[str, Any], past_calls: Sequence[Call]) -> Any:
    hasher = hashlib.sha256(_canonical([list(names), config]))
    for call in past_calls:
        _absorb(hasher, call)
    return hasher


def _absorb(hasher: Any, call: Call) -> None:
    name, arguments = call
    hasher.update(b"\x00" + _canonical([name, arguments]))


def _create_states(toolsets: Sequence[ToolSet], config: Mapping[str, Any]) -> dict[str, object]:
    return {t.name: t.create(copy.deepcopy(dict(config.get(t.name) or {}))) for t in toolsets}


def _replay(states: dict[str, object], routes: Mapping[str, ToolSet], past_calls: Sequence[Call]) -> None:
    for name, arguments in past_calls:
        toolset = routes.get(name)
        if toolset is None:
            continue
        try:
            toolset.invoke(states[toolset.name], name, copy.deepcopy(arguments))
        except Exception:  # noqa: BLE001 - a call that raised the first time raises again; its side effects stay
            continue


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: max(max_chars - 3, 0)] + "..."


def _to_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return json.dumps(str(value), ensure_ascii=False)


def _hallucinated(tool: str, max_chars: int) -> Observation:
    message = f"No such tool: {tool!r}. Nothing was run."
    return Observation(content=_truncate(_to_json({"error": message}), max_chars), hallucinated=True)


def _run(toolset: ToolSet, state: object, tool: str, arguments: dict[str, Any], max_chars: int) -> Observation:
    try:
        result = toolset.invoke(state, tool, copy.deepcopy(arguments))
    except Exception as exc:  # noqa: BLE001 - every tool failure becomes an observation, by protocol
        error = f"{type(exc).__name__}: {exc}"
        log.info("tool.failed", tool=tool, toolset=toolset.name, error=error)
        return Observation(content=_truncate(_to_json({"error": error}), max_chars), error=error)
    return Observation(content=_truncate(_to_json(result), max_chars))


def execute(
    toolset_names: Sequence[str],
    config: Mapping[str, Any],
    past_calls: Sequence[Call],
    tool: str,
    arguments: dict[str, Any],
    *,
    max_chars: int,
    hidden: Collection[str] = (),
    cache: StateCache | None = None,
) -> Observation:
    """Run one call of a trajectory against its tool state, rebuilt by replay when this process has not got it.

    ``config`` maps each tool set name to that tool set's initial configuration. ``past_calls`` are the calls of
    the trajectory that ran before this one, in order: every call whose observation was not hallucinated, failed
    ones included (a call that raised may have changed state before raising, and replay reproduces that exactly).
    ``hidden`` names tools whose documentation the model has not been shown yet (BFCL's miss-function category):
    calling one counts as hallucinated. Tool failures never escape; only configuration errors do
    (:class:`UnknownToolSet`, :class:`ToolNameConflict`). Time limits are the caller's (the Celery task's).
    """
    toolsets = [get_toolset(n) for n in toolset_names]
    routes = _routes(toolsets)
    toolset = routes.get(tool)
    if toolset is None or tool in hidden:
        return _hallucinated(tool, max_chars)
    cache = _CACHE if cache is None else cache
    hasher = _state_hasher(toolset_names, config, past_calls)
    states = cache.take(hasher.hexdigest())
    if states is None:
        states = _create_states(toolsets, config)
        _replay(states, routes, past_calls)
        log.debug("tool.state_rebuilt", toolsets=list(toolset_names), replayed=len(past_calls))
    observation = _run(toolset, states[toolset.name], tool, arguments, max_chars)
    _absorb(hasher, (tool, arguments))
    cache.put(hasher.hexdigest(), states)
    return observation
