"""What one learning-loop cycle trains on, how much it evaluates, and what it takes to promote (UMIQ_TRAIN_*)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from orchestrator.settings import Settings
from training.glpft_config import GLPFTConfig

__all__ = ["CycleConfig"]


@dataclass
class CycleConfig:
    """A cycle's recipe; the registry stores it (with the GLPFT config inside) on every version it produces."""

    min_new_trajectories: int = 50
    """Usable live trajectories finished since the last cycle needed before a scheduled cycle trains; by hand, 0."""

    replay_ratio: float = 1.0
    """Earlier trajectories (seed train split and older traffic) mixed in per new one, against forgetting."""

    seed_category: str = "multi_turn_base"
    """The BFCL category whose train-split ground truth seeds the data (DESIGN §5)."""

    seed_limit: int | None = None
    """Use only the first N seed trajectories of the train split: CPU runs and tests; None uses all."""

    dev_limit: int = 48
    """Teacher-forced dev steps scored per system: the gate's evidence, bounded because every step is a generation."""

    gate_margin: float = 1.0
    """Points (percent) a candidate's metric may trail the serving model's and still be promoted."""

    only_valid: bool = False
    """Train only on live trajectories BFCL's checker judged valid (those with no verdict are left out)."""

    min_score: float | None = None
    """Train only on live trajectories whose mean feedback score is at least this; None ignores feedback."""

    give_ups: Literal["exclude", "negative"] = "exclude"
    """Leave out trajectories with a given-up turn, or keep them as negative (give-up) examples."""

    seed: int = 7
    """Seeds the replay sample, so a cycle's data snapshot repeats from its record."""

    glpft: GLPFTConfig = field(default_factory=GLPFTConfig)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> CycleConfig:
        config = cls(
            min_new_trajectories=settings.train_min_new_trajectories,
            replay_ratio=settings.train_replay_ratio,
            gate_margin=settings.train_gate_margin,
            seed_limit=settings.train_seed_limit,
            dev_limit=settings.train_dev_limit,
            glpft=GLPFTConfig(
                base_model=settings.train_base_model,
                method=settings.train_method,
                max_steps=settings.train_max_steps,
                logging_steps=min(10, settings.train_max_steps or 10),  # a short cycle still records its loss
            ),
        )
        for name, value in overrides.items():
            target = config.glpft if hasattr(config.glpft, name) and not hasattr(config, name) else config
            setattr(target, name, value)
        return config

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["glpft"] = self.glpft.to_dict()
        return data
