"""The model registry: versions and their lineage, the promotion gate, promotion, rejection and rollback.

A version is a row in ``modelversion`` plus a folder in the model store (``UMIQ_MODEL_STORE``). Role workers
configured with ``UMIQ_<ROLE>__MODEL=registry`` poll for their role's active version and switch between two
steps, so a rollout never loses or repeats a step in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlmodel import select

from orchestrator.protocol import MODEL_ROLES
from orchestrator.settings import Settings
from orchestrator.store import ModelStatus, ModelVersion, session_scope, utcnow

__all__ = [
    "ROLE_METRICS",
    "LOWER_IS_BETTER",
    "RegistryError",
    "register",
    "active",
    "serving",
    "versions",
    "gate",
    "promote",
    "reject",
    "rollback",
]

log = structlog.get_logger(__name__)

ROLE_METRICS: dict[str, tuple[str, ...]] = {
    "planner": ("plan_acc",),
    "caller": ("act_em", "arg_f1", "hallu"),
    "summarizer": ("rouge_l",),
}
"""The dev-split metrics (DESIGN §4, in percent) that decide whether a role's candidate may serve."""

LOWER_IS_BETTER = frozenset({"hallu"})


class RegistryError(LookupError):
    """A version or role the registry does not know, or an operation its state does not allow."""


def register(
    engine: sa.Engine,
    *,
    version_id: str,
    role: str,
    path: Path,
    parent: str | None,
    data_snapshot: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> ModelVersion:
    """Record a trained model as a candidate; it serves only once promoted."""
    version = ModelVersion(
        id=version_id,
        role=role,
        parent=parent,
        path=str(path),
        data_snapshot=dict(data_snapshot),
        hyperparameters=dict(hyperparameters),
        metrics=dict(metrics),
    )
    with session_scope(engine) as session:
        session.add(version)
    log.info("model.registered", version=version_id, role=role, parent=parent)
    return version


def active(engine: sa.Engine, role: str) -> ModelVersion | None:
    with session_scope(engine) as session:
        return session.exec(
            select(ModelVersion).where(ModelVersion.role == role, ModelVersion.status == ModelStatus.ACTIVE)
        ).one_or_none()


def serving(engine: sa.Engine, settings: Settings) -> dict[str, str]:
    """What each role serves with ``model=registry``: its active version's folder, or its base model."""
    served = {}
    for role in MODEL_ROLES:
        version = active(engine, role)
        served[role] = version.path if version else settings.role(role).base_model
    return served


def versions(engine: sa.Engine, role: str | None = None) -> list[ModelVersion]:
    """Newest first."""
    with session_scope(engine) as session:
        query = select(ModelVersion).order_by(ModelVersion.created_at.desc())
        if role:
            query = query.where(ModelVersion.role == role)
        return list(session.exec(query).all())


def gate(
    role: str, candidate: Mapping[str, float | None], baseline: Mapping[str, float | None], margin: float
) -> tuple[bool, str]:
    """A candidate passes when none of its role's metrics is worse than the serving model's by more than ``margin``.

    A metric the dev set cannot measure for either model (no such steps: None) is not evidence either way.
    """
    worse, unmeasured = [], []
    for name in ROLE_METRICS[role]:
        if name not in candidate or name not in baseline:
            return False, f"metric {name} missing (candidate has {sorted(candidate)}, baseline {sorted(baseline)})"
        if candidate[name] is None and baseline[name] is None:
            unmeasured.append(name)
            continue
        if candidate[name] is None or baseline[name] is None:
            return False, f"metric {name} measured for only one of candidate and serving model"
        delta = candidate[name] - baseline[name]
        if name in LOWER_IS_BETTER:
            delta = -delta
        if delta < -margin:
            worse.append(f"{name} {candidate[name]:.2f} vs {baseline[name]:.2f}")
    if worse:
        return False, f"worse than the serving model beyond a margin of {margin:g}: " + "; ".join(worse)
    measured = [n for n in ROLE_METRICS[role] if n not in unmeasured]
    summary = ", ".join(f"{n} {candidate[n]:.2f} (serving {baseline[n]:.2f})" for n in measured)
    if unmeasured:
        summary += f"; no dev steps to measure {', '.join(unmeasured)}"
    return True, f"not worse than the serving model within {margin:g}: {summary}"


def _get(session: Any, version_id: str) -> ModelVersion:
    version = session.get(ModelVersion, version_id, with_for_update=True)
    if version is None:
        raise RegistryError(f"no model version {version_id!r}")
    return version


def _role_rows(session: Any, role: str) -> list[ModelVersion]:
    """Lock every version of a role so two promotions of one role cannot interleave."""
    return list(session.exec(select(ModelVersion).where(ModelVersion.role == role).with_for_update()).all())


def promote(engine: sa.Engine, version_id: str, *, reason: str) -> ModelVersion:
    """Make a version its role's active one; the previously active version retires."""
    with session_scope(engine) as session:
        version = _get(session, version_id)
        for row in _role_rows(session, version.role):
            if row.status == ModelStatus.ACTIVE and row.id != version.id:
                row.status = ModelStatus.RETIRED
                row.reason = f"replaced by {version.id}"
                session.add(row)
        version.status = ModelStatus.ACTIVE
        version.reason = reason
        version.promoted_at = utcnow()
        session.add(version)
    log.info("model.promoted", version=version_id, role=version.role, reason=reason)
    return version


def reject(engine: sa.Engine, version_id: str, *, reason: str) -> ModelVersion:
    with session_scope(engine) as session:
        version = _get(session, version_id)
        if version.status == ModelStatus.ACTIVE:
            raise RegistryError(f"{version_id} is serving; roll it back instead of rejecting it")
        version.status = ModelStatus.REJECTED
        version.reason = reason
        session.add(version)
    log.info("model.rejected", version=version_id, reason=reason)
    return version


def rollback(engine: sa.Engine, role: str) -> ModelVersion | None:
    """Reject the active version and reactivate the one it replaced; None means the role falls back to the base model."""
    with session_scope(engine) as session:
        rows = _role_rows(session, role)
        current = next((r for r in rows if r.status == ModelStatus.ACTIVE), None)
        if current is None:
            raise RegistryError(f"no active {role} version to roll back")
        current.status = ModelStatus.REJECTED
        current.reason = "rolled back"
        session.add(current)
        earlier = sorted(
            (r for r in rows if r.status == ModelStatus.RETIRED and r.promoted_at and r.id != current.id),
            key=lambda r: r.promoted_at,
        )
        previous = earlier[-1] if earlier else None
        if previous is not None:
            previous.status = ModelStatus.ACTIVE
            previous.reason = f"restored by rollback of {current.id}"
            previous.promoted_at = utcnow()
            session.add(previous)
    log.info("model.rolled_back", role=role, retired=current.id, active=previous.id if previous else None)
    return previous
