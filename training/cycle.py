"""One turn of the learning loop: collect usable trajectories, run GLPFT, evaluate on dev, register, gate, promote.

``umiq train`` runs a cycle by hand; the ``training`` pool runs it on a schedule (Celery beat) and trains only when
enough new usable trajectories have arrived since the last cycle. Nothing from the dev or test split is trained on.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlmodel import func, select

from orchestrator.protocol import MODEL_ROLES
from orchestrator.settings import Settings
from orchestrator.store import Feedback, ModelVersion, session_scope, utcnow
from training import registry
from training.cycle_config import CycleConfig
from training.evaluate import evaluate_static
from training.glpft import run_glpft
from training.live import trajectories_from_store
from training.samples import Trajectory, glpft_dataset
from training.seed import seed_trajectories
from training.split import assert_trainable, is_trainable, load_split
from workers.backends.local import load_shared

__all__ = ["CycleReport", "collect", "run_cycle"]

log = structlog.get_logger(__name__)
ROLES = MODEL_ROLES


@dataclass
class CycleReport:
    """What a cycle did: trained or skipped (and why), the versions it registered, and each role's gate decision."""

    cycle: str
    trained: bool
    reason: str
    snapshot: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    candidate: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def _last_cutoff(engine: sa.Engine) -> datetime | None:
    """Where the previous cycle's live data ended, read from the newest registered version's data snapshot."""
    with session_scope(engine) as session:
        rows = session.exec(select(ModelVersion).order_by(ModelVersion.created_at.desc()).limit(1)).all()
    until = rows[0].data_snapshot.get("until") if rows else None
    return datetime.fromisoformat(until) if until else None


def _feedback(engine: sa.Engine) -> dict[str, float]:
    with session_scope(engine) as session:
        rows = session.exec(select(Feedback.trajectory_id, func.avg(Feedback.score)).group_by(Feedback.trajectory_id))
        return {trajectory_id: float(score) for trajectory_id, score in rows}


def _live(engine: sa.Engine, config: CycleConfig, since: datetime | None) -> list[Trajectory]:
    found = trajectories_from_store(
        engine,
        only_valid=config.only_valid,
        min_score=config.min_score,
        give_ups=config.give_ups,
        since=since,
        feedback=_feedback(engine) if config.min_score is not None else None,
    )
    return [t for t in found if is_trainable(t.task_id)]


def collect(engine: sa.Engine, config: CycleConfig) -> tuple[list[Trajectory], list[Trajectory], dict[str, Any]]:
    """New live trajectories, a replay sample of earlier data, and the snapshot that records both."""
    cutoff = _last_cutoff(engine)
    until = utcnow()
    everything = _live(engine, config, None)
    new = _live(engine, config, cutoff) if cutoff else everything
    seed = seed_trajectories(config.seed_category, ids=sorted(load_split("train")))[: config.seed_limit]
    earlier = seed + everything[: len(everything) - len(new)]
    rng = random.Random(config.seed)
    wanted = len(earlier) if not new else min(len(earlier), round(config.replay_ratio * len(new)))
    replay = rng.sample(earlier, wanted)
    snapshot = {
        "until": until.isoformat(),
        "since": cutoff.isoformat() if cutoff else None,
        "new": len(new),
        "replay": len(replay),
        "seed_category": config.seed_category,
        "task_ids": sorted({t.task_id for t in [*new, *replay] if t.task_id}),
    }
    return new, replay, snapshot


def _dev_set(config: CycleConfig) -> list[Trajectory]:
    return seed_trajectories(config.seed_category, ids=sorted(load_split("dev")))


def _evaluate(models: dict[str, str], dev: list[Trajectory], config: CycleConfig, settings: Settings) -> dict[str, float]:
    backends = load_shared(models, cache_dir=settings.resolved_model_cache)
    result = evaluate_static(
        dev, backends, compat=settings.prompt_mode == "compat", limit=config.dev_limit, batch_size=4,
        max_new_tokens=settings.planner.max_new_tokens, description_chars=settings.doc_description_chars,
    )
    return result.metrics.to_dict()


def _register_all(
    engine: sa.Engine, stages: dict[str, Any], snapshot: dict[str, Any], config: CycleConfig, metrics: dict[str, float]
) -> dict[str, str]:
    ids = {}
    global_version = stages["global"].version
    for stage, result in stages.items():
        ids[stage] = registry.register(
            engine,
            version_id=result.version,
            role="backbone" if stage == "global" else stage,
            path=Path(result.model_path),
            parent=None if stage == "global" else global_version,
            data_snapshot=snapshot,
            hyperparameters=config.to_dict(),
            metrics={} if stage == "global" else metrics,
        ).id
    return ids


def run_cycle(engine: sa.Engine, settings: Settings, config: CycleConfig, *, force: bool = False) -> CycleReport:
    """Train, evaluate, register and gate; ``force`` trains even when too few new trajectories arrived."""
    started = time.monotonic()
    cycle = f"cycle-{utcnow():%Y%m%d-%H%M%S}"
    new, replay, snapshot = collect(engine, config)
    if len(new) < config.min_new_trajectories and not force:
        reason = f"{len(new)} new usable trajectories since the last cycle; {config.min_new_trajectories} needed"
        log.info("cycle.skipped", reason=reason)
        return CycleReport(cycle, False, reason, snapshot)
    trajectories = [*new, *replay]
    assert_trainable(t.task_id for t in trajectories)
    samples = glpft_dataset(trajectories, compat=settings.prompt_mode == "compat", description_chars=settings.doc_description_chars)
    log.info("cycle.training", cycle=cycle, trajectories=len(trajectories), samples={k: len(v) for k, v in samples.items()})
    stages = run_glpft(config.glpft, samples, settings.resolved_model_store / cycle)
    dev = _dev_set(config)
    baseline = _evaluate(registry.serving(engine, settings), dev, config, settings)
    candidate = _evaluate({role: stages[role].model_path for role in ROLES}, dev, config, settings)
    ids = _register_all(engine, stages, snapshot, config, candidate)
    decisions = {}
    for role in ROLES:
        ok, why = registry.gate(role, candidate, baseline, config.gate_margin)
        (registry.promote if ok else registry.reject)(engine, ids[role], reason=why)
        decisions[role] = {"version": ids[role], "promoted": ok, "reason": why}
    report = CycleReport(
        cycle,
        True,
        f"trained on {len(new)} new and {len(replay)} replayed trajectories",
        snapshot,
        {stage: result.to_dict() for stage, result in stages.items()},
        baseline,
        candidate,
        decisions,
        time.monotonic() - started,
    )
    log.info("cycle.done", cycle=cycle, decisions=decisions, seconds=round(report.seconds, 1))
    return report
