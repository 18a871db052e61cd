"""The model registry on real Postgres: gate, promotion, rollback, and a running worker picking up a new version."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from orchestrator.client import Client
from orchestrator.schemas import TaskOptions, TaskSpec
from orchestrator.settings import Settings
from orchestrator.store import ModelStatus
from tests.pools import running_pools, scripted_roles
from training import registry
from workers.backends.models import TINY_SMOLLM2, VERSION_FILE, resolve_model


def _register(engine: sa.Engine, role: str, path: Path | str = "/nowhere", version_id: str | None = None) -> str:
    version_id = version_id or f"{role}-{uuid.uuid4().hex[:8]}"
    registry.register(
        engine,
        version_id=version_id,
        role=role,
        path=Path(path),
        parent=None,
        data_snapshot={"trajectories": 3},
        hyperparameters={"lr": 1e-5},
        metrics={},
    )
    return version_id


@pytest.mark.parametrize(
    ("candidate", "baseline", "passes"),
    [
        ({"plan_acc": 80.0}, {"plan_acc": 80.5}, True),
        ({"plan_acc": 78.0}, {"plan_acc": 80.0}, False),
        ({"plan_acc": 95.0}, {"plan_acc": 10.0}, True),
    ],
)
def test_gate_allows_a_margin_and_no_more(candidate: dict, baseline: dict, passes: bool) -> None:
    ok, reason = registry.gate("planner", candidate, baseline, margin=1.0)
    assert ok is passes
    assert ("plan_acc" in reason) and (passes or "worse" in reason)


def test_gate_treats_hallucination_as_lower_is_better() -> None:
    base = {"act_em": 50.0, "arg_f1": 50.0, "hallu": 1.0}
    assert registry.gate("caller", {**base, "hallu": 0.5}, base, margin=0.0)[0]
    ok, reason = registry.gate("caller", {**base, "hallu": 3.0}, base, margin=1.0)
    assert not ok and "hallu 3.00 vs 1.00" in reason


def test_gate_refuses_missing_metrics() -> None:
    ok, reason = registry.gate("summarizer", {}, {"rouge_l": 3.0}, margin=1.0)
    assert not ok and "missing" in reason


def test_promote_retires_the_previous_version_and_rollback_restores_it(clean_registry: sa.Engine) -> None:
    engine = clean_registry
    first, second = _register(engine, "caller"), _register(engine, "caller")
    registry.promote(engine, first, reason="first")
    registry.promote(engine, second, reason="better")
    assert registry.active(engine, "caller").id == second
    assert {v.id: v.status for v in registry.versions(engine, "caller")}[first] == ModelStatus.RETIRED
    restored = registry.rollback(engine, "caller")
    assert restored.id == first and registry.active(engine, "caller").id == first
    statuses = {v.id: (v.status, v.reason) for v in registry.versions(engine, "caller")}
    assert statuses[second] == (ModelStatus.REJECTED, "rolled back")
    assert registry.rollback(engine, "caller") is None
    assert registry.active(engine, "caller") is None
    with pytest.raises(registry.RegistryError):
        registry.rollback(engine, "caller")


def test_rejecting_a_serving_version_is_refused(clean_registry: sa.Engine) -> None:
    engine = clean_registry
    version = _register(engine, "summarizer")
    registry.promote(engine, version, reason="ok")
    with pytest.raises(registry.RegistryError, match="roll it back"):
        registry.reject(engine, version, reason="no")
    with pytest.raises(registry.RegistryError, match="no model version"):
        registry.promote(engine, "missing", reason="x")


def test_a_running_worker_serves_a_newly_promoted_version(
    settings: Settings, clean_registry: sa.Engine, tmp_path: Path
) -> None:
    engine = clean_registry
    base = resolve_model(TINY_SMOLLM2, settings.resolved_model_cache)
    version_id = f"planner-{uuid.uuid4().hex[:8]}"
    candidate = settings.resolved_model_store / version_id
    shutil.copytree(base, candidate)
    (candidate / VERSION_FILE).write_text(version_id)
    planner_from_registry = {
        **scripted_roles(),
        "UMIQ_PLANNER__BACKEND": "local",
        "UMIQ_PLANNER__MODEL": "registry",
        "UMIQ_PLANNER__BASE_MODEL": TINY_SMOLLM2,
        "UMIQ_PLANNER__MAX_NEW_TOKENS": "4",
        "UMIQ_REGISTRY_POLL_S": "0.2",
    }
    spec = TaskSpec(turns=["Add 1 and 2."], tools=["calculator"], options=TaskOptions(max_steps_per_turn=1))
    with running_pools(settings, tmp_path, planner_from_registry):
        client = Client(settings)
        before = client.wait(client.submit(spec), timeout=120)
        registry.promote(engine, _register(engine, "planner", candidate, version_id), reason="test")
        time.sleep(1.0)  # longer than UMIQ_REGISTRY_POLL_S: the worker's next step looks again
        after = client.wait(client.submit(spec), timeout=120)
    served = [[s.model_version for s in client.get(v.id, detail=True).steps if s.kind == "planner"] for v in (before, after)]
    assert served[0] and served[0][0].startswith(TINY_SMOLLM2)
    assert served[1] and set(served[1]) == {version_id}


def test_gate_does_not_count_a_metric_the_dev_set_cannot_measure() -> None:
    ok, reason = registry.gate("summarizer", {"rouge_l": None}, {"rouge_l": None}, margin=0.0)
    assert ok and "no dev steps to measure rouge_l" in reason
    assert not registry.gate("summarizer", {"rouge_l": None}, {"rouge_l": 10.0}, margin=0.0)[0]
