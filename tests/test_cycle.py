"""A whole learning-loop cycle on CPU with the tiny model: GLPFT's four stages, dev evaluation, registry, gate,
promotion, and running role workers serving the promoted versions. Real Postgres, Redis and Celery workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from orchestrator.client import Client
from orchestrator.schemas import TaskOptions, TaskSpec
from orchestrator.settings import Settings
from orchestrator.store import ModelStatus
from tests.pools import running_pools
from training import registry
from training.cycle import run_cycle
from training.cycle_config import CycleConfig
from training.split import load_split
from workers.backends.models import TINY_SMOLLM2

ROLES = ("PLANNER", "CALLER", "SUMMARIZER")
SERVE_FROM_REGISTRY = {
    **{f"UMIQ_{r}__MODEL": "registry" for r in ROLES},
    **{f"UMIQ_{r}__BASE_MODEL": TINY_SMOLLM2 for r in ROLES},
    **{f"UMIQ_{r}__MAX_NEW_TOKENS": "6" for r in ROLES},
    "UMIQ_REGISTRY_POLL_S": "0.2",
}


@pytest.fixture
def tiny(settings: Settings) -> Settings:
    roles = {r.lower(): settings.role(r.lower()).model_copy(update={"base_model": TINY_SMOLLM2, "max_new_tokens": 6}) for r in ROLES}
    return settings.model_copy(update={"train_base_model": TINY_SMOLLM2, **roles})


def _config(tiny: Settings, **overrides: object) -> CycleConfig:
    config = CycleConfig.from_settings(tiny, seed_limit=3, dev_limit=4, gate_margin=100.0, **overrides)
    config.glpft.max_steps = 2
    config.glpft.global_stage.max_length = config.glpft.planner.max_length = 1024
    config.glpft.caller.max_length = config.glpft.summarizer.max_length = 1024
    return config


def test_a_cycle_trains_registers_promotes_and_the_workers_serve_it(
    tiny: Settings, clean_registry: sa.Engine, tmp_path: Path
) -> None:
    engine = clean_registry
    with running_pools(tiny, tmp_path, SERVE_FROM_REGISTRY):
        report = run_cycle(engine, tiny, _config(tiny), force=True)
        assert report.trained, report.reason
        assert set(report.stages) == {"global", "planner", "caller", "summarizer"}
        bfcl_ids = {i for i in report.snapshot["task_ids"] if i.startswith("multi_turn_")}
        assert bfcl_ids and bfcl_ids <= load_split("train")  # live traffic of other tests is trainable too
        for role in ("planner", "caller", "summarizer"):
            decision = report.decisions[role]
            assert decision["promoted"], decision["reason"]
            version = registry.active(engine, role)
            assert version.id == decision["version"] and version.parent == report.stages["global"]["version"]
            assert version.hyperparameters["glpft"]["max_steps"] == 2 and version.metrics == report.candidate
        backbone = [v for v in registry.versions(engine, "backbone") if v.id == report.stages["global"]["version"]]
        assert backbone and backbone[0].status == ModelStatus.CANDIDATE
        client = Client(tiny)
        spec = TaskSpec(turns=["Add 1 and 2."], tools=["calculator"], options=TaskOptions(max_steps_per_turn=1))
        view = client.get(client.wait(client.submit(spec), timeout=180).id, detail=True)
    planner_versions = {s.model_version for s in view.steps if s.kind == "planner"}
    assert planner_versions == {report.decisions["planner"]["version"]}


def test_a_scheduled_cycle_waits_for_enough_new_trajectories(tiny: Settings, clean_registry: sa.Engine) -> None:
    report = run_cycle(clean_registry, tiny, _config(tiny, min_new_trajectories=10_000))
    assert not report.trained
    assert "10000 needed" in report.reason
