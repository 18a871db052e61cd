"""Role models that replay BFCL's ground truth through the real serving path (scripted backend, any prompt mode).

Workers are stateless, so each step finds its place from the prompt alone: the entry is the BFCL entry of the
category ``REPLAY_CATEGORY`` (default ``multi_turn_base``; the four categories share most first turns, so one
category at a time) whose user turns, as umiq submits them (:func:`orchestrator.bfcl_tasks.bfcl_task`), open the
conversation in order; the current turn is the last of them found; the calls made in it are the caller messages
after it. The planner asks for the next ground-truth call while some remain and concludes once none does, the
caller writes that call, the summarizer answers in one line. Two entries that open alike and differ in the
ground truth of the turn reached make the step fail (the scripted backend turns the error into the step's error).

``REPLAY_SKIP`` names a JSON file, read at every step, listing ``[bfcl_id, turn, index]`` ground-truth calls to
leave out: a test changes it between runs without restarting the pools.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from orchestrator.bfcl_tasks import bfcl_task, entry
from orchestrator.protocol import Decision, Prompt, format_call, format_planner
from workers.tools import bfcl

SKIP_ENV = "REPLAY_SKIP"
CATEGORY_ENV = "REPLAY_CATEGORY"
_ENDS = ("\n", "</s>")
"""What follows a message in the history: the next message in chat mode, the end-of-turn marker in compat mode."""

Call = tuple[str, dict[str, Any]]


@cache
def _openings(category: str) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """First user turn -> (entry id, all user turns) of the category's entries that open with it."""
    index: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for item in bfcl.load_entries(category):
        turns = tuple(bfcl_task(item["id"]).turns)
        index.setdefault(turns[0], []).append((item["id"], turns))
    return index


@cache
def _ground_truth(bfcl_id: str) -> list[list[Call]]:
    return bfcl.ground_truth_calls(entry(bfcl_id))


def _find_message(text: str, content: str, start: int) -> int:
    """End of the first history message ``content`` from ``start`` on, or -1 (a longer message only starting so is no match)."""
    at = text.find(content, start)
    while at >= 0:
        end = at + len(content)
        if end == len(text) or text.startswith(_ENDS, end):
            return end
        at = text.find(content, at + 1)
    return -1


def _turns_reached(text: str, turns: tuple[str, ...]) -> tuple[int, int]:
    """The last of ``turns`` found in order in the history, and where its message ends."""
    turn, position = -1, 0
    for i, content in enumerate(turns):
        end = _find_message(text, f"user: {content}", position)
        if end < 0:
            break
        turn, position = i, end
    return turn, position


def _skipped(bfcl_id: str, turn: int) -> set[int]:
    path = os.environ.get(SKIP_ENV)
    if not path or not Path(path).exists():
        return set()
    return {index for skip_id, skip_turn, index in json.loads(Path(path).read_text()) if (skip_id, skip_turn) == (bfcl_id, turn)}


def _place(prompt: Prompt) -> tuple[list[Call], int]:
    """The ground-truth calls of the current turn (minus skipped ones) and how many of them the turn has made."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    found = []
    for opening, candidates in _openings(os.environ.get(CATEGORY_ENV, "multi_turn_base")).items():
        if _find_message(text, f"user: {opening}", 0) >= 0:
            found += [(bfcl_id, *_turns_reached(text, turns)) for bfcl_id, turns in candidates]
    if not found:
        raise LookupError("no BFCL entry opens this conversation")
    reached = max(turn for _, turn, _ in found)
    plans = {}
    for bfcl_id, turn, position in found:
        if turn == reached:
            skipped = _skipped(bfcl_id, turn)
            calls = [call for i, call in enumerate(_ground_truth(bfcl_id)[turn]) if i not in skipped]
            plans[json.dumps(calls, sort_keys=True)] = (calls, text.count("caller: Action:", position))
    if len(plans) > 1:
        raise LookupError(f"entries {sorted(i for i, *_ in found)} open alike but differ in turn {reached}")
    return next(iter(plans.values()))


def planner(prompt: Prompt) -> str:
    calls, made = _place(prompt)
    if made < len(calls):
        return format_planner(f"Next I call {calls[made][0]}.", Decision.CALL)
    return format_planner("Every call this request needs is made.", Decision.CONCLUSION)


def caller(prompt: Prompt) -> str:
    calls, made = _place(prompt)
    name, arguments = calls[made]
    return format_call(name, arguments)


def summarizer(prompt: Prompt) -> str:
    return "Done."

