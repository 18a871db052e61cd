"""The GLPFT recipe as data: what the trainer reads, and what the registry stores so a model version can be rebuilt.

Defaults are DESIGN §3's reference hyper-parameters (α-UMi, 7B, 8 GPUs, global batch 48, bf16, length 4096)
scaled to SmolLM2-135M on one device:

- **batch** 48 -> 16 (2 per device x 8 accumulation): our seed data (BFCL, a few thousand steps) is an order of
  magnitude smaller than ToolBench's, so a smaller batch keeps a useful number of optimizer steps per epoch.
- **learning rate** x2 (global 5e-5 -> 1e-4, local 1e-5 -> 2e-5): a 576-wide model tolerates a learning rate
  about 7x higher than a 4096-wide one (the 1/width rule of muP-style scaling), and the 3x smaller batch asks
  for about 3x lower (linear scaling); the net ~2.4x is rounded down to 2x, and the reference's 5:1 ratio of
  global to local rate is kept.
- **length** 4096 -> 8192, SmolLM2's whole context: BFCL prompts with compact tool docs measure 2.2k to 4.5k
  tokens (chat mode, multi_turn_base), and a prompt cut from the front loses its tool docs first. At 8192
  training cuts only what LocalBackend would cut when serving; 2 rows x 8192 tokens per forward pass hold the
  same memory as the reference's 4 x 4096 would.
- **epochs, warm-up, schedule, weight decay** as in the reference: they do not depend on model size.
- **LoRA** r=8, alpha=16, dropout 0.05 as in the reference's LoRA variant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from orchestrator.settings import DEFAULT_MODEL

__all__ = ["STAGES", "GLPFTConfig", "StageConfig"]

STAGES = ("global", "planner", "caller", "summarizer")
"""GLPFT's stages in the order they run: the global stage first, then the three local stages."""

_STAGE_FIELDS = {"global": "global_stage", "planner": "planner", "caller": "caller", "summarizer": "summarizer"}
_NOT_IDENTITY = ("output_dir", "logging_steps", "save_steps", "save_total_limit")


@dataclass
class StageConfig:
    """The optimisation recipe of one GLPFT stage."""

    learning_rate: float = 2e-5
    """Peak learning rate (full fine-tuning; LoRA multiplies it by ``lora_lr_multiplier``). Reference x2, see above."""

    epochs: float = 1.0
    """Passes over the stage's samples: 2 global, 1 planner and caller, 2 summarizer, as in the reference."""

    warmup_ratio: float = 0.2
    """Fraction of the steps spent warming up linearly: 0.4 global, 0.2 local, as in the reference."""

    weight_decay: float = 0.01
    """AdamW weight decay: 0.01 in the reference's local stages, none stated (so 0) for the global stage."""

    scheduler: str = "cosine"
    """Learning-rate schedule after warm-up (a transformers ``SchedulerType``): cosine, as in the reference."""

    per_device_batch_size: int = 2
    """Samples per forward pass: 2 x 8 accumulation = 16 per optimizer step (reference 48, scaled down above)."""

    grad_accumulation: int = 8
    """Forward passes per optimizer step; raise it (and lower the batch) when memory is short, same result."""

    max_length: int = 8192
    """Tokens of prompt + target; longer inputs lose the prompt's beginning. SmolLM2's context (reference 4096)."""

    seed: int = 42
    """Seeds data order, dropout and LoRA initialisation, so a run repeats from its record."""


def _global_stage() -> StageConfig:
    return StageConfig(learning_rate=1e-4, epochs=2.0, warmup_ratio=0.4, weight_decay=0.0)


def _summarizer_stage() -> StageConfig:
    return StageConfig(epochs=2.0)


@dataclass
class GLPFTConfig:
    """The whole GLPFT run: base model, full or LoRA fine-tuning, the four stages, and how the trainer runs them."""

    base_model: str = DEFAULT_MODEL
    """What the global stage starts from, as ``resolve_model`` names it: the offline SmolLM2-135M by default."""

    method: Literal["full", "lora"] = "full"
    """``full`` updates every weight (135M fits anywhere); ``lora`` trains adapters, then merges them for serving."""

    lora_r: int = 8
    """LoRA rank, the reference's LoRA variant."""

    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r = 2), the reference's LoRA variant."""

    lora_dropout: float = 0.05
    """Dropout on the LoRA branch, the reference's LoRA variant."""

    lora_target_modules: str | list[str] = "all-linear"
    """Which linear layers get adapters: all of them but the output head, since a small model needs the capacity."""

    lora_lr_multiplier: float = 10.0
    """LoRA's learning rate over the stage's: adapters start at zero in a low-rank subspace and want ~10x the rate."""

    global_stage: StageConfig = field(default_factory=_global_stage)
    """The single-agent stage on every assistant step (``backbone`` samples): lr 1e-4, 2 epochs, warm-up 0.4."""

    planner: StageConfig = field(default_factory=StageConfig)
    """The planner's local stage from the global checkpoint: lr 2e-5, 1 epoch, warm-up 0.2, weight decay 0.01."""

    caller: StageConfig = field(default_factory=StageConfig)
    """The caller's local stage from the global checkpoint: lr 2e-5, 1 epoch, warm-up 0.2, weight decay 0.01."""

    summarizer: StageConfig = field(default_factory=_summarizer_stage)
    """The summarizer's local stage from the global checkpoint: lr 2e-5, 2 epochs, warm-up 0.2, weight decay 0.01."""

    output_dir: str = ""
    """Where stage folders go; empty means ``<UMIQ_HOME>/glpft``. Not part of a version's identity."""

    gradient_checkpointing: bool = True
    """Recompute activations in backward: bounds memory at 2 rows x 8192 tokens on small GPUs (~25% slower)."""

    bf16: Literal["auto"] | bool = "auto"
    """Mixed precision: ``auto`` is bf16 on a CUDA device that has it, fp32 elsewhere (CPU bf16 is slow and lossy)."""

    group_by_length: bool = True
    """Batch samples of similar length together: tool-doc prompts vary 10x in length, so padding would dominate."""

    logging_steps: int = 10
    """Optimizer steps between loss records (the loss history of a stage result)."""

    save_steps: int = 100
    """Optimizer steps between checkpoints: what a killed run resumes from (about 10 minutes of a CPU stage)."""

    save_total_limit: int = 2
    """Checkpoints kept per stage: the latest is all a resume needs, one more in case it was written half."""

    max_steps: int | None = None
    """Stops every stage after this many optimizer steps whatever the epochs say: smoke tests and benchmarks."""

    def stage(self, name: str) -> StageConfig:
        """The recipe of a stage by its name in ``STAGES``."""
        if name not in STAGES:
            raise ValueError(f"unknown GLPFT stage {name!r}; expected one of {', '.join(STAGES)}")
        return getattr(self, _STAGE_FIELDS[name])

    def learning_rate(self, name: str) -> float:
        """The rate a stage actually trains at: LoRA scales the stage's full fine-tuning rate."""
        rate = self.stage(name).learning_rate
        return rate * self.lora_lr_multiplier if self.method == "lora" else rate

    def use_bf16(self) -> bool:
        """Resolves ``auto`` on this machine: bf16 only where CUDA supports it."""
        if self.bf16 == "auto":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return bool(self.bf16)

    def identity(self, name: str) -> dict[str, Any]:
        """The fields that change what a stage learns: its own recipe and the shared ones, not logging or paths.

        A stage's version fingerprint hashes this, so changing the planner's rate leaves the global stage finished.
        """
        record = self.to_dict()
        for key in (*_NOT_IDENTITY, *(f for stage, f in _STAGE_FIELDS.items() if stage != name)):
            del record[key]
        return record

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, as the registry stores it next to a model version."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GLPFTConfig:
        """The inverse of ``to_dict``; fields missing from an older record take today's defaults."""
        stage_fields = set(_STAGE_FIELDS.values())
        values = {key: StageConfig(**value) if key in stage_fields else value for key, value in data.items()}
        return cls(**values)
