"""The headline comparison (issue 4): four systems trained on the same data with the same budget, then scored alike.

- **base**: the untrained backbone in all three roles.
- **single_llm**: GLPFT's global stage only, one model for the whole agent. Statically it answers as one agent (the
  backbone format it was trained on: rationale, then action or conclusion); served, it sits in all three roles.
- **multi_direct**: three role models fine-tuned straight from the backbone, without the global stage.
- **glpft**: α-UMi: the global stage, then each role fine-tuned from it.

*Same budget* means the same number of optimizer steps (each of the same number of samples) in all: GLPFT spends
``global_steps`` on the global stage and ``local_steps`` on each role; the direct role models share that total
equally, ``ceil((global_steps + 3 * local_steps) / 3)`` steps each. A direct role model starts from the backbone
as the global stage does, so it trains with the global stage's recipe (rate, warm-up), not the lower local rate
meant for continuing from a fine-tuned checkpoint. The single-LLM system is the global stage of the GLPFT run, so
it is the same model GLPFT continues from, which is the paper's comparison.

Static scores use the cascade evaluation for the multi-LLM systems (:mod:`training.evaluate`): each writes its own
rationale before its action, as the single-LLM system does, so the four rows are like for like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.protocol import MODEL_ROLES
from training.evaluate import StaticEvaluation, evaluate_static
from training.glpft import StageResult, run_stage
from training.glpft_config import GLPFTConfig
from training.samples import Sample, Trajectory
from workers.backends.local import LocalBackend, load_shared
from workers.backends.models import resolve_model

__all__ = ["ROLES", "SYSTEMS", "System", "TrainedSystems", "evaluate_system", "train_systems"]

ROLES = MODEL_ROLES
SYSTEMS = ("base", "single_llm", "multi_direct", "glpft")
"""The systems in the order the table and the chart show them."""

_DESCRIPTIONS = {
    "base": "untrained backbone in all three roles",
    "single_llm": "global stage only: one model as the whole agent",
    "multi_direct": "three role models fine-tuned directly from the backbone",
    "glpft": "alpha-UMi GLPFT: global stage, then one local stage per role",
}


@dataclass(frozen=True)
class System:
    """What serves each role of one system; ``single`` is set where one model answers as the whole agent."""

    name: str
    description: str
    roles: dict[str, str]
    single: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "roles": self.roles, "single": self.single}


@dataclass
class TrainedSystems:
    """The four systems and every training stage behind them, keyed ``global``, ``glpft_<role>``, ``direct_<role>``."""

    systems: dict[str, System]
    stages: dict[str, StageResult] = field(default_factory=dict)

    def training_seconds(self, system: str) -> float:
        """Wall time of the stages a system's models went through (the global stage counts for both its users)."""
        names = {
            "base": [],
            "single_llm": ["global"],
            "multi_direct": [f"direct_{r}" for r in ROLES],
            "glpft": ["global", *(f"glpft_{r}" for r in ROLES)],
        }[system]
        return round(sum(self.stages[n].wall_s for n in names), 1)


def direct_steps(global_steps: int, local_steps: int) -> int:
    """Steps per direct role model so the three together spend GLPFT's whole budget."""
    return math.ceil((global_steps + len(ROLES) * local_steps) / len(ROLES))


def _direct_config(config: GLPFTConfig, role: str, steps: int) -> GLPFTConfig:
    """The role's stage with the global stage's recipe: it starts from the backbone, as the global stage does."""
    return replace(config, max_steps=steps, **{role: replace(config.global_stage)})


def train_systems(
    config: GLPFTConfig,
    samples: Mapping[str, Sequence[Sample]],
    root: Path,
    *,
    global_steps: int,
    local_steps: int,
    model_cache: Path,
) -> TrainedSystems:
    """Train GLPFT (global + three local stages) and the three direct role models into ``root``.

    ``samples`` is :func:`training.samples.glpft_dataset`'s output keyed by role value. Every stage resumes or
    skips as :func:`training.glpft.run_stage` does, so a killed comparison continues where it stopped.
    """
    base = resolve_model(config.base_model, model_cache)
    stages: dict[str, StageResult] = {}
    stages["global"] = run_stage(replace(config, max_steps=global_steps), "global", base, samples["backbone"], root / "global")
    parent = Path(stages["global"].model_path)
    local = replace(config, max_steps=local_steps)
    steps = direct_steps(global_steps, local_steps)
    for role in ROLES:
        stages[f"glpft_{role}"] = run_stage(local, role, parent, samples[role], root / "glpft" / role)
        stages[f"direct_{role}"] = run_stage(
            _direct_config(config, role, steps), role, base, samples[role], root / "direct" / role
        )
    systems = {
        "base": System("base", _DESCRIPTIONS["base"], dict.fromkeys(ROLES, str(base))),
        "single_llm": System(
            "single_llm", _DESCRIPTIONS["single_llm"], dict.fromkeys(ROLES, str(parent)), single=str(parent)
        ),
        "multi_direct": System(
            "multi_direct", _DESCRIPTIONS["multi_direct"], {r: stages[f"direct_{r}"].model_path for r in ROLES}
        ),
        "glpft": System("glpft", _DESCRIPTIONS["glpft"], {r: stages[f"glpft_{r}"].model_path for r in ROLES}),
    }
    return TrainedSystems(systems, stages)


def evaluate_system(
    system: System, trajectories: Sequence[Trajectory], *, model_cache: Path | None = None, **options: Any
) -> StaticEvaluation:
    """Score a system by teacher forcing (``options`` as :func:`training.evaluate.evaluate_static` takes them):
    one agent where the system has one, else the multi-LLM cascade with one loaded model per distinct path."""
    if system.single is not None:
        return evaluate_static(trajectories, LocalBackend(system.single, cache_dir=model_cache), **options)
    return evaluate_static(trajectories, load_shared(system.roles, cache_dir=model_cache), cascade=True, **options)
