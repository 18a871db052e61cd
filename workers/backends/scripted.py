"""A backend that answers from a Python function instead of a model: deterministic tests and replayed benchmarks.

``UMIQ_<ROLE>__BACKEND=scripted`` with ``UMIQ_<ROLE>__MODEL=package.module:function``; the function takes the
rendered prompt and returns the text the model would have written.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from orchestrator.protocol import Prompt
from workers.backends.base import GenerationRequest, GenerationResult

__all__ = ["ScriptedBackend"]


def _prompt_words(prompt: Prompt) -> int:
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    return len(text.split())


class ScriptedBackend:
    """Runs ``module:function`` on each prompt; a function that raises yields that step's error, not the batch's."""

    def __init__(self, target: str) -> None:
        module_name, _, attr = target.partition(":")
        if not attr:
            raise ValueError(f"scripted backend needs 'module:function', got {target!r}")
        self._script: Callable[[Prompt], str] = getattr(importlib.import_module(module_name), attr)
        self.model_version = f"scripted:{target}"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return [self._one(request) for request in requests]

    def _one(self, request: GenerationRequest) -> GenerationResult:
        try:
            text = self._script(request.prompt)
        except Exception as exc:
            return GenerationResult(text="", tokens_in=_prompt_words(request.prompt), tokens_out=0, error=f"{type(exc).__name__}: {exc}")
        return GenerationResult(text=text, tokens_in=_prompt_words(request.prompt), tokens_out=len(text.split()))
