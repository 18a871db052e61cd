"""Fault tolerance, proven on a private cluster that the tests break: SIGKILLed workers, a broker that forgets, a
database that goes away, and steps that never succeed.

Each scenario runs 30 scripted trajectories (the issue's 100 is what ``python -m bench.soak`` runs; 30 keeps this
file within about four minutes on two cores) through the real pools, under a supervisor that restarts whatever dies,
against a Redis and a PostgreSQL started here on free loopback ports, never the shared ones. Settings are shrunk so
recovery is quick: a step may take 4 s (so its messages expire after 68 s), the sweeper runs every second and
re-sends a step after 8 s without a result. After each scenario the store is audited: every trajectory finished
(completed, or failed with a reason), none stuck, no step or message stored twice, every completed trajectory
exactly the steps and messages its turns call for.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from orchestrator import queues
from orchestrator.api import create_app
from orchestrator.protocol import ModelRole
from orchestrator.queues import STEP_RESULT
from orchestrator.settings import REGISTRY, RoleSettings, Settings
from orchestrator.store import Step
from tests.celery_messages import decode
from tests.fault_harness import (
    POISON_CRASH,
    POISON_ERROR,
    Audit,
    Cluster,
    audit,
    cluster,
    drive,
    retry_db,
    submit_all,
    use_broker,
    wait_finished,
    workload,
)
from tests.pools import REPO
from tests.servers import ServerUnavailable, free_port

TRAJECTORIES = 30
TUNING = {
    "UMIQ_STEP_TIMEOUT_S": "4",
    "UMIQ_SWEEP_AFTER_S": "8",
    "UMIQ_SWEEP_INTERVAL_S": "1",
    "UMIQ_TEST_ROLE_DELAY_S": "0.1",
    "UMIQ_MAX_ATTEMPTS": "3",
}
FINISH_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        with cluster(tmp_path_factory.mktemp("faults"), TUNING) as running:
            yield running
    except ServerUnavailable as exc:
        pytest.fail(f"the fault tests need a private Redis and PostgreSQL and could not start one: {exc}", pytrace=False)


@pytest.fixture
def ready(faulty: Cluster) -> Cluster:
    """Every pool up (a previous scenario may have just killed one) before a scenario starts."""
    faulty.pools.wait_ready(faulty.pools.names, timeout=60)
    return faulty


def _assert_clean(report: Audit, *, all_completed: bool) -> None:
    summary = json.dumps(report.summary(), indent=1)
    assert not report.lost, f"trajectories never stored: {summary}"
    assert not report.stuck, f"trajectories still running: {report.stuck[:5]}\n{summary}"
    assert report.duplicated_steps == 0, summary
    assert not report.problems, summary
    assert report.completed + sum(report.failed.values()) == report.submitted, summary
    if all_completed:
        assert report.completed == report.submitted, summary


def _sweeper_events(faulty: Cluster, reason: str) -> int:
    return sum(1 for line in faulty.pools.log_text("sweeper").splitlines() if '"step.resent"' in line and reason in line)


def test_sigkilled_workers_lose_nothing_and_store_nothing_twice(ready: Cluster) -> None:
    """kill -9 of each pool (its whole process group, or one prefork child), repeatedly, while tasks keep arriving."""
    faulty = ready
    targets = ["planner", "caller", "summarizer", "tools", "orchestrator", "sweeper", "tools-child", "planner", "orchestrator"]
    random.Random(7).shuffle(targets)

    def kill(target: str) -> Callable[[], None]:
        return (lambda: faulty.pools.kill_child("tools")) if target == "tools-child" else (lambda: faulty.pools.kill(target))

    faults = [(2.0 + 2.0 * i, f"kill -9 {target}", kill(target)) for i, target in enumerate(targets)]
    run = drive(faulty.client(), workload(TRAJECTORIES, seed=1), submit_every_s=0.5, faults=faults, timeout=FINISH_TIMEOUT_S)
    report = audit(faulty.engine, run.expected)
    print(f"worker crashes {run.faults}: {json.dumps(report.summary())}, {report.resent_steps} steps re-sent with an "
          f"attempt counted, {run.seconds:.0f} s, restarts {faulty.pools.restarts}")
    _assert_clean(report, all_completed=False)
    for reason in report.failed:
        assert reason.startswith("dead letter: no result"), f"a crash may only dead-letter a step it hit 3 times: {reason}"
    assert all(faulty.pools.restarts[name] >= 1 for name in ("planner", "caller", "summarizer", "tools", "orchestrator", "sweeper"))


def test_a_redis_restart_without_persistence_loses_no_step(ready: Cluster) -> None:
    """Redis dies (every queued and unacked message with it) and comes back empty 2 s later; the sweeper re-sends."""
    faulty = ready
    before = _sweeper_events(faulty, "the broker restarted")
    faults = [(4.0, "redis restart, 2 s down", lambda: faulty.redis.restart(down_s=2))]
    run = drive(faulty.client(), workload(TRAJECTORIES, seed=2), submit_every_s=0.3, faults=faults, timeout=FINISH_TIMEOUT_S)
    report = audit(faulty.engine, run.expected)
    print(f"broker restart: {json.dumps(report.summary())}, {report.resent_steps} steps re-sent with an attempt counted, "
          f"{run.seconds:.0f} s")
    _assert_clean(report, all_completed=True)
    assert _sweeper_events(faulty, "the broker restarted") > before, "the sweeper never noticed the broker's restart"


def test_a_ten_second_database_outage_is_ridden_out(ready: Cluster) -> None:
    """Postgres stops for 10 s mid-run: results wait in the orchestrator's retries, the sweeper waits, nothing is lost.

    The tools pool and the sweeper are killed during the outage: restarted, each waits for the store, once.
    """
    faulty = ready
    restarts = dict(faulty.pools.restarts)
    faults = [
        (4.0, "postgres stop", lambda: faulty.postgres.stop("fast")),
        (6.0, "kill -9 tools", lambda: faulty.pools.kill("tools")),
        (7.0, "kill -9 sweeper", lambda: faulty.pools.kill("sweeper")),
        (14.0, "postgres start", faulty.postgres.start),
    ]
    run = drive(faulty.client(), workload(TRAJECTORIES, seed=3), submit_every_s=0.4, faults=faults, timeout=FINISH_TIMEOUT_S)
    report = retry_db(lambda: audit(faulty.engine, run.expected))
    print(f"database outage: {json.dumps(report.summary())}, {report.resent_steps} steps re-sent with an attempt counted, "
          f"{run.seconds:.0f} s")
    _assert_clean(report, all_completed=True)
    assert "retry: Retry in" in faulty.pools.log_text("orchestrator"), "no step result was retried through the outage"
    for name in ("tools", "sweeper"):
        assert faulty.pools.restarts[name] == restarts[name] + 1, f"{name} crash-looped through the outage"
        assert '"store.unavailable"' in faulty.pools.log_text(name, since_start=True)


def test_poison_steps_are_dead_lettered_with_their_error_and_shown(ready: Cluster) -> None:
    """A step whose model always errs, and one that kills its worker every time, end as dead letters; others finish.

    The worker killer takes the steps running beside it down each time; the sweeper sends suspects back one at a
    time, so only the culprit is dead-lettered.
    """
    faulty = ready
    client = faulty.client()
    expected = submit_all(client, [POISON_ERROR, POISON_CRASH, *workload(6, seed=4)])
    took = wait_finished(faulty.engine, list(expected), FINISH_TIMEOUT_S)
    report = audit(faulty.engine, expected)
    _assert_clean(report, all_completed=False)
    assert report.completed == 6, json.dumps(report.summary())
    failing, crashing = list(expected)[:2]

    failed = client.get(failing)
    assert failed.status == "failed" and "dead after 3 attempts" in failed.failure and "scripted model failure" in failed.failure
    [dead] = failed.dead_letters
    assert (dead.kind, dead.status, dead.attempt) == ("caller", "dead", 2) and "scripted model failure" in dead.error

    crashed = client.get(crashing)
    assert crashed.status == "failed" and "dead after 3 attempts" in crashed.failure, crashed.failure
    [dead] = crashed.dead_letters
    assert dead.kind == "caller" and "no result" in dead.error and "worker may have died" in dead.error
    print(f"poison: {took:.0f} s; crash-looping step: {crashed.failure}")

    # Redis kept no copy of the killer's messages to hand out again (ack emulation is off): the sweeper's re-sends
    # were the only way back, so the step ran exactly its three attempts.
    with Session(faulty.engine) as session:
        killer = session.exec(select(Step).where(Step.trajectory_id == crashed.trajectory_id, Step.kind == "caller")).one()
    with redis.Redis.from_url(faulty.redis.url) as broker:
        assert not broker.exists("unacked", "unacked_index"), "kombu's ack emulation is on again"
        queued = [decode(raw)[1] for raw in broker.lrange("caller", 0, -1)]
    assert not [kwargs for kwargs in queued if kwargs.get("step_id") == killer.id]

    api = create_app(faulty.settings.model_copy(update={"api_auth": False}))
    with TestClient(api) as http:
        body = http.get(f"/v1/tasks/{crashing}").json()
    use_broker(faulty.settings)
    assert [(d["kind"], d["status"]) for d in body["dead_letters"]] == [("caller", "dead")]
    assert "worker may have died" in body["dead_letters"][0]["error"]

    env = {**faulty.pools.env, "COLUMNS": "200"}
    shown = subprocess.run([sys.executable, "-m", "orchestrator.cli", "show", failing], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "dead letter: step 1 (caller, turn 0) after 3 attempts" in shown.stdout and "DEAD after 3 attempts" in shown.stdout


def test_a_result_delivered_again_changes_nothing(ready: Cluster) -> None:
    """At-least-once delivery, answered by idempotency: a second result for a finished step is logged and dropped."""
    faulty = ready
    client = faulty.client()
    [(task_id, shape)] = submit_all(client, workload(1, seed=5)).items()
    wait_finished(faulty.engine, [task_id], 60)
    before = client.get(task_id, detail=True)
    assert before.status == "completed", before.failure
    first = before.steps[0]
    with Session(faulty.engine) as session:
        step_id = session.exec(select(Step.id).where(Step.idempotency_key == f"{before.trajectory_id}/{first.seq}")).one()
    ignored = faulty.pools.log_text("orchestrator").count('"step.duplicate_result"')
    queues.app.send_task(STEP_RESULT, kwargs={"step_id": step_id, "result": {"text": "a different answer.\n Next: give up."}})
    deadline = time.monotonic() + 30
    while faulty.pools.log_text("orchestrator").count('"step.duplicate_result"') == ignored:
        assert time.monotonic() < deadline, "the orchestrator never received the second result"
        time.sleep(0.2)
    after = client.get(task_id, detail=True)
    assert after.steps == before.steps and after.messages == before.messages and after.status == "completed"
    assert audit(faulty.engine, {task_id: shape}).ok


def test_a_registry_served_worker_keeps_its_model_while_the_store_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Role workers touch the store only to poll the registry; an outage must not fail the steps they can serve."""
    from workers import roles

    unreachable = Settings(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone", broker_url="",
                           planner=RoleSettings(model=REGISTRY))
    monkeypatch.setattr(roles, "_checked_at", 0.0)
    monkeypatch.setattr(roles, "_serving", None)
    with pytest.raises(sa.exc.OperationalError):
        roles._wanted_model(unreachable, ModelRole.PLANNER)
    monkeypatch.setattr(roles, "_serving", "/models/planner-v3")
    assert roles._wanted_model(unreachable, ModelRole.PLANNER) == "/models/planner-v3"
