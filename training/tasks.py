"""The ``training`` queue's task: one learning-loop cycle, scheduled by beat or sent by ``umiq train --queue``."""

from __future__ import annotations

from typing import Any

from celery import Task

from orchestrator.queues import TRAIN_CYCLE, app
from orchestrator.settings import get_settings
from orchestrator.store import get_engine
from training.cycle import run_cycle
from training.cycle_config import CycleConfig

__all__ = ["train_cycle"]


@app.task(name=TRAIN_CYCLE, bind=True, acks_late=True)
def train_cycle(self: Task, force: bool = False) -> dict[str, Any]:
    """Run a cycle; a scheduled one trains only when enough new usable trajectories arrived."""
    settings = get_settings()
    report = run_cycle(get_engine(settings.resolved_database_url), settings, CycleConfig.from_settings(settings), force=force)
    return {"cycle": report.cycle, "trained": report.trained, "reason": report.reason, "decisions": report.decisions}
