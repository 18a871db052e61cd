"""Deterministic stand-ins for the three role models, used by pipeline tests through the scripted backend.

The user turn steers them: ``CALL {json}`` names the call to make, ``GIVEUP`` makes the planner give up,
``FAIL`` makes the caller's backend raise (a model that errors on every attempt).
"""

from __future__ import annotations

import json
import re

from orchestrator.protocol import Prompt


def _text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _current_turn(text: str) -> str:
    """Everything from the last user message on."""
    return text[text.rfind("\nuser: ") + 1 :] if "\nuser: " in text else text[text.find("user: ") :]


def planner(prompt: Prompt) -> str:
    turn = _current_turn(_text(prompt))
    if "GIVEUP" in turn:
        return "This cannot be done with these tools.\n Next: give up."
    if "observation:" in turn:
        return "The tool answered, so I can conclude.\n Next: conclusion."
    return "I need to call a tool for this.\n Next: caller."


def caller(prompt: Prompt) -> str:
    turn = _current_turn(_text(prompt))
    if "FAIL" in turn:
        raise RuntimeError("scripted model failure")
    match = re.search(r"CALL (\{.*\})", turn)
    call = json.loads(match.group(1)) if match else {"tool": "pwd", "arguments": {}}
    return f"Action: {call['tool']}\nAction Input: {json.dumps(call['arguments'])}"


def summarizer(prompt: Prompt) -> str:
    turn = _current_turn(_text(prompt))
    observations = re.findall(r"observation: (.*)", turn)
    return f"Done. Last observation: {observations[-1] if observations else 'none'}"
