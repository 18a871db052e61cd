"""Prompt to token ids, the one way: serving and GLPFT training share it so a model trains on what it is served.

Chat prompts are rendered with the tokenizer's chat template (which writes its own special tokens) and tokenized
without adding more; plain text gets only what the tokenizer adds by default.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from orchestrator.protocol import Prompt

__all__ = ["encode_prompt"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The token ids a model continues from: what LocalBackend generates after and what training masks out."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
