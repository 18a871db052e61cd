"""GET /metrics on real brokers and Postgres: queue depths as the broker holds them, and step figures from the store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import queues
from orchestrator.api import create_app
from orchestrator.queues import EXECUTE_TOOL, generate_task_name
from orchestrator.settings import Settings
from orchestrator.store import Step, StepStatus, Task, Trajectory, session_scope, utcnow
from tests.servers import RedisServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def on_own_redis(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The session's settings on a Redis server of the test's own, so queue depths are exactly ours.

    The window spans the whole session, so no earlier test's step leaves it between two scrapes of one test.
    """
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield settings.model_copy(update={"broker_url": server.url, "metrics_window_s": 86400.0})
    finally:
        server.stop()
        queues.configure(settings)  # create_app pointed the process-wide Celery app elsewhere


def scrape(settings: Settings) -> Samples:
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def send(settings: Settings, counts: dict[str, int]) -> None:
    """Publish real task messages to the settings' broker, with no worker to take them."""
    sender = Celery("metrics-test")
    sender.conf.update(queues.celery_config(settings))
    for name, count in counts.items():
        for _ in range(count):
            sender.send_task(name, kwargs={"step_id": 0})


def depth(samples: Samples, queue: str) -> float:
    return samples[("umiq_queue_depth", (("queue", queue),))]


def test_queue_depth_is_what_redis_holds(on_own_redis: Settings, engine: sa.Engine) -> None:
    send(on_own_redis, {generate_task_name("planner"): 3, EXECUTE_TOOL: 1})
    samples = scrape(on_own_redis)
    assert samples[("umiq_broker_up", ())] == 1
    assert {queue: depth(samples, queue) for queue in queues.QUEUES} == {
        "planner": 3, "caller": 0, "summarizer": 0, "tools": 1, "orchestrator": 0, "training": 0,
    }


def test_queue_depth_counts_the_embedded_brokers_files(settings: Settings, tmp_path: Path) -> None:
    embedded = Settings(home=tmp_path, broker_url="", database_url=f"sqlite:///{tmp_path / 'umiq.db'}")
    try:
        send(embedded, {generate_task_name("caller"): 2})
        samples = scrape(embedded)
    finally:
        queues.configure(settings)
    assert (depth(samples, "caller"), depth(samples, "planner")) == (2, 0)


def test_a_broker_outage_still_serves_the_stores_figures(settings: Settings, engine: sa.Engine) -> None:
    try:
        samples = scrape(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    finally:
        queues.configure(settings)
    assert samples[("umiq_broker_up", ())] == 0
    assert ("umiq_step_latency_seconds_count", (("role", "planner"),)) in samples


def _store_steps(engine: sa.Engine) -> None:
    """Finished steps as pools would have left them, plus two the window must leave out (too old, still queued)."""
    now = utcnow()
    finished = [  # kind, seconds from dispatch to result, tokens out, batch size
        *[("planner", 0.2, 10, 4)] * 3,
        ("caller", 0.03, 5, 1),
        ("tools", 0.01, None, None),
    ]
    with session_scope(engine) as session:
        task = Task(turns=["hi"], toolsets=[])
        trajectory = Trajectory(task_id=task.id)
        session.add_all([task, trajectory])
        session.flush()
        for seq, (kind, seconds, tokens, batch) in enumerate(finished):
            session.add(Step(trajectory_id=trajectory.id, seq=seq, turn=0, kind=kind, status=StepStatus.DONE,
                             idempotency_key=f"{trajectory.id}/{seq}", tokens_out=tokens, batch_size=batch,
                             dispatched_at=now - timedelta(seconds=seconds), finished_at=now))
        old = now - timedelta(days=2)
        session.add(Step(trajectory_id=trajectory.id, seq=8, turn=0, kind="planner", status=StepStatus.DONE,
                         idempotency_key=f"{trajectory.id}/8", tokens_out=999, batch_size=1, dispatched_at=old,
                         finished_at=old))
        session.add(Step(trajectory_id=trajectory.id, seq=9, turn=0, kind="planner", idempotency_key=f"{trajectory.id}/9"))


def test_step_latency_tokens_and_batch_sizes_come_from_recent_steps(on_own_redis: Settings, engine: sa.Engine) -> None:
    before = scrape(on_own_redis)
    _store_steps(engine)
    after = scrape(on_own_redis)

    def added(name: str, role: str, le: str | None = None) -> float:
        key = (name, (("le", le), ("role", role)) if le else (("role", role),))
        return after[key] - before[key]

    window = on_own_redis.metrics_window_s
    assert added("umiq_step_latency_seconds_count", "planner") == 3
    assert (added("umiq_step_latency_seconds_bucket", "planner", "0.1"),
            added("umiq_step_latency_seconds_bucket", "planner", "0.25")) == (0, 3)
    assert added("umiq_step_latency_seconds_sum", "planner") == pytest.approx(0.6, abs=0.01)
    assert added("umiq_step_latency_seconds_bucket", "tools", "0.01") == 1
    assert added("umiq_generated_tokens_per_second", "planner") == pytest.approx(30 / window)
    assert added("umiq_generated_tokens_per_second", "caller") == pytest.approx(5 / window)
    assert (added("umiq_step_batch_size_bucket", "planner", "2.0"),
            added("umiq_step_batch_size_bucket", "planner", "4.0")) == (0, 3)
    assert added("umiq_step_batch_size_bucket", "caller", "1.0") == 1
    assert ("umiq_step_batch_size_count", (("role", "tools"),)) not in after
