"""What a role worker asks of an inference backend: rendered prompts in, text and token counts out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.protocol import Prompt

__all__ = ["GenerationRequest", "GenerationResult", "Backend"]


@dataclass(frozen=True)
class GenerationRequest:
    """One step's generation: a prompt (text, or chat messages for the model's template) and its decoding limits."""

    prompt: Prompt
    max_new_tokens: int = 96
    temperature: float = 0.0
    stop: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class GenerationResult:
    """The generated text (cut at the first stop string, stop string kept) and what it cost."""

    text: str
    tokens_in: int
    tokens_out: int
    error: str | None = None


class Backend(Protocol):
    """A loaded model that generates for a batch of requests; each result lines up with its request."""

    model_version: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...
