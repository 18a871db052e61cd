"""The client surface against real Postgres and Redis: HTTP API, in-process Client and HttpClient behave alike."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from orchestrator import engine as engine_ops
from orchestrator import queues
from orchestrator.api import create_app
from orchestrator.client import Client, HttpClient, RequestRejected, TaskTimeout
from orchestrator.engine import NotFound, UnknownToolSet
from orchestrator.settings import Settings
from orchestrator.store import (
    Feedback,
    Message,
    Step,
    StepStatus,
    Task,
    ToolCall,
    Trajectory,
    TrajectoryStatus,
    session_scope,
)
from tests.celery_messages import decode
from tests.live_server import free_port, serve

__all__: list[str] = []

TABLES = (Task, Trajectory, Message, Step, ToolCall, Feedback)


# ---------------------------------------------------------------------------------------------------------- helpers


def counts(db: sa.Engine) -> dict[str, int]:
    with Session(db) as session:
        return {table.__name__: session.exec(select(func.count()).select_from(table)).one() for table in TABLES}


def planner_messages(broker: redis.Redis) -> list[dict[str, Any]]:
    """Celery messages waiting on the planner queue, decoded to their task name, kwargs and expiry."""
    out = []
    for raw in broker.lrange("planner", 0, -1):
        headers, kwargs = decode(raw)
        out.append({"task": headers["task"], "kwargs": kwargs, "expires": headers["expires"]})
    return out


def spec(tools: list[str], **extra: Any) -> dict[str, Any]:
    return {"turns": ["What is 2 + 3?"], "tools": tools, **extra}


def finish(db: sa.Engine, trajectory_id: str, status: TrajectoryStatus = TrajectoryStatus.COMPLETED) -> None:
    """End a trajectory as the engine would, without a worker: the status row is all the views read."""
    with session_scope(db) as session:
        trajectory = session.get(Trajectory, trajectory_id)
        trajectory.status = status
        trajectory.finished_at = trajectory.updated_at
        session.add(trajectory)


def step_id(db: sa.Engine, trajectory_id: str, seq: int) -> int:
    with Session(db) as session:
        return session.exec(select(Step.id).where(Step.trajectory_id == trajectory_id, Step.seq == seq)).one()


@pytest.fixture
def app(settings: Settings, engine: sa.Engine) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def http(app: FastAPI, api_key: str) -> Iterator[TestClient]:
    """A client sending a fresh API key on every request: the tests see their own tasks only."""
    with TestClient(app, headers={"Authorization": f"Bearer {api_key}"}) as client:
        yield client


@pytest.fixture
def small_app(settings: Settings, engine: sa.Engine) -> FastAPI:
    """An API with a small body limit and turn limit, so the edges are cheap to reach (no keys: tests/test_security.py)."""
    return create_app(settings.model_copy(update={"api_max_body_bytes": 4096, "api_max_turns": 2, "api_auth": False}))


@pytest.fixture
def live_api(small_app: FastAPI) -> Iterator[str]:
    """The small API under a real uvicorn server, for real chunked uploads and the HTTP client."""
    with serve(small_app, log_level="warning") as url:
        yield url


# ----------------------------------------------------------------------------------------------------------- submit


def test_submit_stores_everything_and_publishes_to_planner_queue(
    http: TestClient, engine: sa.Engine, catalog: str, redis_queues: redis.Redis, settings: Settings
) -> None:
    before = counts(engine)
    response = http.post("/v1/tasks", json=spec([catalog], meta={"bfcl_id": "x1"}))
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]
    assert response.json() == {"id": task_id}

    after = counts(engine)
    added = {k: after[k] - before[k] for k in after}
    assert added == {"Task": 1, "Trajectory": 1, "Message": 1, "Step": 1, "ToolCall": 0, "Feedback": 0}
    with Session(engine) as session:
        task = session.get(Task, task_id)
        assert (task.turns, task.toolsets, task.meta) == (["What is 2 + 3?"], [catalog], {"bfcl_id": "x1"})
        trajectory = session.exec(select(Trajectory).where(Trajectory.task_id == task_id)).one()
        assert trajectory.status == TrajectoryStatus.RUNNING
        assert [s["name"] for s in trajectory.tool_specs] == ["add", "echo"]
        message = session.exec(select(Message).where(Message.trajectory_id == trajectory.id)).one()
        assert (message.seq, message.speaker, message.content) == (0, "user", "What is 2 + 3?")
        step = session.exec(select(Step).where(Step.trajectory_id == trajectory.id)).one()
        assert (step.seq, step.kind, step.status) == (0, "planner", StepStatus.QUEUED)
        assert step.dispatched_at is not None

    assert redis_queues.llen("planner") == 1
    [published] = planner_messages(redis_queues)
    assert published["task"] == "umiq.generate.planner"
    assert published["kwargs"]["step_id"] == step.id
    assert published["kwargs"]["trajectory_id"] == trajectory.id
    assert "What is 2 + 3?" in json.dumps(published["kwargs"]["prompt"])
    # A copy that waited longer than this has been re-sent by the sweeper: a worker drops it.
    lifetime = (datetime.fromisoformat(published["expires"]) - step.dispatched_at).total_seconds()
    assert abs(lifetime - queues.step_expiry_s(settings)) < 5, published["expires"]


def test_submit_without_tools_is_accepted(http: TestClient, engine: sa.Engine, redis_queues: redis.Redis) -> None:
    response = http.post("/v1/tasks", json={"turns": ["Say hello."]})
    assert response.status_code == 201, response.text
    assert redis_queues.llen("planner") == 1


def test_unknown_tool_set_is_400_and_stores_nothing(
    http: TestClient, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    before = counts(engine)
    response = http.post("/v1/tasks", json=spec([catalog, "NoSuchAPI"]))
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "unknown tool set(s): NoSuchAPI" in detail and catalog in detail
    assert counts(engine) == before
    assert redis_queues.llen("planner") == 0


def test_malformed_json_is_422(http: TestClient, engine: sa.Engine) -> None:
    before = counts(engine)
    response = http.post("/v1/tasks", content=b'{"turns": ["hi"', headers={"content-type": "application/json"})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == "json_invalid"
    assert counts(engine) == before


@pytest.mark.parametrize(
    ("body", "where", "kind"),
    [
        ({"turns": []}, ["body", "turns"], "too_short"),
        ({"turns": ["   "]}, ["body", "turns", 0], "string_too_short"),
        ({"turns": ["hi", ""]}, ["body", "turns", 1], "string_too_short"),
        ({"turns": ["hi"], "priority": 1}, ["body", "priority"], "extra_forbidden"),
        ({"turns": ["hi"], "options": {"retries": 3}}, ["body", "options", "retries"], "extra_forbidden"),
        ({"turns": ["hi"], "options": {"max_steps": 0}}, ["body", "options", "max_steps"], "greater_than_equal"),
        ({"turns": ["hi"], "tools": ["bad name!"]}, ["body", "tools", 0], "string_pattern_mismatch"),
        ({"turns": "hi"}, ["body", "turns"], "list_type"),
        ({"tools": []}, ["body", "turns"], "missing"),
    ],
)
def test_invalid_task_is_422_with_clear_errors(
    http: TestClient, engine: sa.Engine, body: dict[str, Any], where: list[Any], kind: str
) -> None:
    before = counts(engine)
    response = http.post("/v1/tasks", json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert {"loc": where, "type": kind} in [{"loc": e["loc"], "type": e["type"]} for e in errors], errors
    assert all(e["msg"] and "input" not in e for e in errors)
    assert counts(engine) == before


def test_too_many_turns_is_422(small_app: FastAPI, engine: sa.Engine) -> None:
    before = counts(engine)
    with TestClient(small_app) as client:
        response = client.post("/v1/tasks", json={"turns": ["a", "b", "c"]})
    assert response.status_code == 422
    assert response.json() == {"detail": "a task may carry at most 2 user turns; this one would carry 3"}
    assert counts(engine) == before


# ------------------------------------------------------------------------------------------------------- body limit


def test_oversized_body_with_content_length_is_413(
    http: TestClient, settings: Settings, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    before = counts(engine)
    body = json.dumps(spec([catalog], meta={"blob": "x" * settings.api_max_body_bytes})).encode()
    response = http.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    assert response.request.headers["content-length"] == str(len(body))
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body exceeds the limit of {settings.api_max_body_bytes} bytes"}
    assert counts(engine) == before
    assert redis_queues.llen("planner") == 0


def test_oversized_chunked_body_is_413(
    http: TestClient, settings: Settings, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    before = counts(engine)
    body = json.dumps(spec([catalog], meta={"blob": "x" * settings.api_max_body_bytes})).encode()
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    response = http.post("/v1/tasks", content=chunks, headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["detail"]
    assert counts(engine) == before
    assert redis_queues.llen("planner") == 0


def test_body_limit_edges(small_app: FastAPI, engine: sa.Engine, catalog: str, redis_queues: redis.Redis) -> None:
    """A body of exactly the limit is read and stored; one byte more is refused; a garbled length is a 400."""
    head = json.dumps(spec([catalog], meta={"pad": ""})).encode()
    exact = head.replace(b'"pad": ""', b'"pad": "' + b"p" * (4096 - len(head)) + b'"')
    assert len(exact) == 4096
    over = exact.replace(b'"pad": "', b'"pad": "p')
    json_header = {"content-type": "application/json"}
    with TestClient(small_app) as client:
        assert client.post("/v1/tasks", content=exact, headers=json_header).status_code == 201
        before = counts(engine)
        assert client.post("/v1/tasks", content=over, headers=json_header).status_code == 413
        garbled = client.post("/v1/tasks", content=b"{}", headers={**json_header, "content-length": "two"})
    assert garbled.status_code == 400 and garbled.json() == {"detail": "Content-Length is not a number"}
    assert counts(engine) == before


@pytest.mark.usefixtures("redis_queues")
def test_chunked_upload_to_a_real_server(live_api: str, engine: sa.Engine, catalog: str) -> None:
    """Through uvicorn the body arrives in many chunks: the count across them is what trips the limit."""
    before = counts(engine)
    body = json.dumps(spec([catalog], meta={"blob": "x" * 12_000})).encode()
    chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
    response = httpx.post(f"{live_api}/v1/tasks", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"detail": "request body exceeds the limit of 4096 bytes"}
    assert counts(engine) == before
    small = json.dumps(spec([catalog])).encode()
    small_chunks = (small[i : i + 10] for i in range(0, len(small), 10))
    accepted = httpx.post(f"{live_api}/v1/tasks", content=small_chunks, headers={"content-type": "application/json"})
    assert accepted.status_code == 201, accepted.text


# ------------------------------------------------------------------------------------------------------------ reads


@pytest.mark.usefixtures("redis_queues")
def test_status_and_trajectory_views(http: TestClient, engine: sa.Engine, catalog: str) -> None:
    task_id = http.post("/v1/tasks", json=spec([catalog])).json()["id"]
    status = http.get(f"/v1/tasks/{task_id}")
    assert status.status_code == 200
    view = status.json()
    assert view["id"] == task_id
    assert (view["status"], view["turn"], view["turns"], view["tools"]) == ("running", 0, ["What is 2 + 3?"], [catalog])
    assert (view["outcomes"], view["failure"], view["finished_at"]) == ([], None, None)
    assert (view["messages"], view["steps"]) == ([], [])

    trajectory = http.get(f"/v1/tasks/{task_id}/trajectory").json()
    assert trajectory["trajectory_id"] == view["trajectory_id"]
    assert trajectory["messages"] == [{"seq": 0, "turn": 0, "speaker": "user", "content": "What is 2 + 3?"}]
    [step] = trajectory["steps"]
    assert (step["seq"], step["kind"], step["status"], step["raw_text"]) == (0, "planner", "queued", None)

    assert http.get(f"/v1/tasks/{task_id}/steps").json() == []
    finish(engine, view["trajectory_id"], TrajectoryStatus.FAILED)
    assert http.get(f"/v1/tasks/{task_id}").json()["status"] == "failed"


def test_steps_endpoint_returns_finished_steps_after_a_cursor(
    http: TestClient, settings: Settings, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    task_id = http.post("/v1/tasks", json=spec([catalog])).json()["id"]
    trajectory_id = http.get(f"/v1/tasks/{task_id}").json()["trajectory_id"]
    engine_ops.handle_result(engine, step_id(engine, trajectory_id, 0), {"text": "Enough. Next: conclusion."}, settings)
    steps = http.get(f"/v1/tasks/{task_id}/steps").json()
    assert [(s["seq"], s["kind"], s["status"]) for s in steps] == [(0, "planner", "done")]
    assert steps[0]["parsed"] == {"rationale": "Enough.", "decision": "conclusion"}
    assert http.get(f"/v1/tasks/{task_id}/steps", params={"after_seq": 0}).json() == []
    assert http.get(f"/v1/tasks/{task_id}/steps", params={"after_seq": -2}).status_code == 422


def test_list_filters_and_pages(http: TestClient, engine: sa.Engine, catalog: str, redis_queues: redis.Redis) -> None:
    first = http.post("/v1/tasks", json=spec([catalog])).json()["id"]
    second = http.post("/v1/tasks", json=spec([catalog])).json()["id"]
    finish(engine, http.get(f"/v1/tasks/{first}").json()["trajectory_id"])

    page = http.get("/v1/tasks", params={"limit": 2}).json()
    assert (page["limit"], page["offset"]) == (2, 0)
    assert [t["id"] for t in page["items"]] == [second, first]
    assert [t["id"] for t in http.get("/v1/tasks", params={"limit": 1, "offset": 1}).json()["items"]] == [first]

    completed = [t["id"] for t in http.get("/v1/tasks", params={"status": "completed", "limit": 500}).json()["items"]]
    running = [t["id"] for t in http.get("/v1/tasks", params={"status": "running", "limit": 500}).json()["items"]]
    assert first in completed and first not in running
    assert second in running and second not in completed
    assert all(t["status"] == "running" for t in http.get("/v1/tasks", params={"status": "running"}).json()["items"])

    assert http.get("/v1/tasks", params={"status": "sleeping"}).status_code == 422
    assert http.get("/v1/tasks", params={"limit": 0}).status_code == 422
    assert http.get("/v1/tasks", params={"offset": -1}).status_code == 422


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/tasks/{id}", None),
        ("GET", "/v1/tasks/{id}/trajectory", None),
        ("GET", "/v1/tasks/{id}/steps", None),
        ("POST", "/v1/tasks/{id}/turns", {"text": "more"}),
    ],
)
def test_unknown_id_is_404(
    http: TestClient, engine: sa.Engine, method: str, path: str, body: dict[str, str] | None
) -> None:
    before = counts(engine)
    response = http.request(method, path.format(id="nosuchtask"), json=body)
    assert response.status_code == 404
    assert response.json() == {"detail": "task nosuchtask not found"}
    assert counts(engine) == before


# ------------------------------------------------------------------------------------------------------------ turns


def test_append_turn(http: TestClient, engine: sa.Engine, catalog: str, redis_queues: redis.Redis) -> None:
    task_id = http.post("/v1/tasks", json=spec([catalog])).json()["id"]
    trajectory_id = http.get(f"/v1/tasks/{task_id}").json()["trajectory_id"]

    while_running = http.post(f"/v1/tasks/{task_id}/turns", json={"text": "  And 4 + 5?  "})
    assert while_running.status_code == 202
    assert while_running.json() == {"id": task_id, "turns": 2}
    view = http.get(f"/v1/tasks/{task_id}/trajectory").json()
    assert view["turns"] == ["What is 2 + 3?", "And 4 + 5?"]
    assert len(view["steps"]) == 1 and redis_queues.llen("planner") == 1  # queued behind the running turn

    finish(engine, trajectory_id)
    after_finish = http.post(f"/v1/tasks/{task_id}/turns", json={"text": "Now 6 + 7?"})
    assert after_finish.json() == {"id": task_id, "turns": 3}
    view = http.get(f"/v1/tasks/{task_id}/trajectory").json()
    assert (view["status"], view["turn"]) == ("running", 1)
    # the turn appended while it ran never started, so it is the one that runs now; "Now 6 + 7?" waits behind it
    assert view["messages"][-1] == {"seq": 1, "turn": 1, "speaker": "user", "content": "And 4 + 5?"}
    steps = [(s["seq"], s["kind"], s["status"]) for s in view["steps"]]
    assert steps == [(0, "planner", "queued"), (1, "planner", "queued")]
    assert redis_queues.llen("planner") == 2


@pytest.mark.parametrize("body", [{"text": ""}, {"text": "   "}, {}, {"text": "hi", "speaker": "user"}, {"text": 3}])
def test_invalid_turn_is_422(http: TestClient, engine: sa.Engine, catalog: str, body: dict[str, Any]) -> None:
    task_id = http.post("/v1/tasks", json=spec([catalog])).json()["id"]
    before = counts(engine)
    assert http.post(f"/v1/tasks/{task_id}/turns", json=body).status_code == 422
    assert counts(engine) == before
    assert len(http.get(f"/v1/tasks/{task_id}").json()["turns"]) == 1


@pytest.mark.usefixtures("engine", "redis_queues")
def test_append_beyond_turn_limit_is_422(small_app: FastAPI) -> None:
    with TestClient(small_app) as client:
        task_id = client.post("/v1/tasks", json={"turns": ["a", "b"]}).json()["id"]
        response = client.post(f"/v1/tasks/{task_id}/turns", json={"text": "c"})
        assert response.status_code == 422
        assert "at most 2 user turns" in response.json()["detail"]
        assert client.get(f"/v1/tasks/{task_id}").json()["turns"] == ["a", "b"]


# -------------------------------------------------------------------------------------------------------------- ops


def test_openapi_lists_the_routes(http: TestClient) -> None:
    schema = http.get("/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"post"} <= set(paths["/v1/tasks"]) and {"get"} <= set(paths["/v1/tasks"])
    for path in ("/v1/tasks/{task_id}", "/v1/tasks/{task_id}/trajectory", "/v1/tasks/{task_id}/steps", "/healthz"):
        assert "get" in paths[path], path
    assert "post" in paths["/v1/tasks/{task_id}/turns"]
    body_schema = paths["/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["$ref"].endswith("/TaskSpec")
    assert http.get("/docs").status_code == 200


def test_healthz(http: TestClient) -> None:
    response = http.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_store_outage_is_503_json(settings: Settings, api_key: str) -> None:
    """A Postgres that refuses connections (a closed port, not a mock) yields JSON 503s, not tracebacks."""
    down = settings.model_copy(update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"})
    # no lifespan: it would try to migrate the unreachable store; the key lookup meets the outage first
    client = TestClient(create_app(down), headers={"X-API-Key": api_key})
    assert client.get("/healthz").status_code == 503
    response = client.get("/v1/tasks/abc")
    assert (response.status_code, response.json()) == (503, {"detail": "the store is unavailable; retry later"})


# ----------------------------------------------------------------------------------------------------------- client


@pytest.mark.usefixtures("engine")
def test_client_submit_get_and_append(settings: Settings, catalog: str, redis_queues: redis.Redis) -> None:
    client = Client(settings)
    task_id = client.submit(spec([catalog]))
    view = client.get(task_id)
    assert (view.id, view.status, view.tools) == (task_id, "running", [catalog])
    assert redis_queues.llen("planner") == 1
    assert client.append_turn(task_id, "And 4 + 5?") == 2
    assert [m.speaker for m in client.get(task_id, detail=True).messages] == ["user"]
    with pytest.raises(NotFound):
        client.get("nosuchtask")
    with pytest.raises(UnknownToolSet):
        client.submit(spec(["NoSuchAPI"]))
    with pytest.raises(ValueError, match="turns"):
        client.submit({"turns": []})


def test_client_wait_times_out_on_an_unprocessed_task(
    settings: Settings, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    client = Client(settings)
    task_id = client.submit(spec([catalog]))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still running") as raised:
        client.wait(task_id, timeout=0.6)
    assert 0.6 <= time.monotonic() - started < 2.0
    assert isinstance(raised.value, TaskTimeout) and raised.value.last.status == "running"


@pytest.mark.usefixtures("redis_queues")
def test_client_wait_returns_once_finished(settings: Settings, engine: sa.Engine, catalog: str) -> None:
    client = Client(settings)
    task_id = client.submit(spec([catalog]))
    threading.Timer(0.3, finish, (engine, client.get(task_id).trajectory_id, TrajectoryStatus.FAILED)).start()
    assert client.wait(task_id, timeout=5).status == "failed"


def test_client_stream_yields_each_step_once_and_ends_with_the_trajectory(
    settings: Settings, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    """Results land through the engine while the stream polls; it ends when the summarizer completes the task."""
    client = Client(settings)
    task_id = client.submit(spec([catalog]))
    trajectory_id = client.get(task_id).trajectory_id

    def work() -> None:
        time.sleep(0.3)
        planner = step_id(engine, trajectory_id, 0)
        engine_ops.handle_result(engine, planner, {"text": "Done. Next: conclusion."}, settings)
        time.sleep(0.5)
        engine_ops.handle_result(engine, step_id(engine, trajectory_id, 1), {"text": "2 + 3 = 5."}, settings)

    worker = threading.Thread(target=work)
    worker.start()
    steps = list(client.stream(task_id, timeout=10))
    worker.join()
    assert [(s.seq, s.kind, s.status) for s in steps] == [(0, "planner", "done"), (1, "summarizer", "done")]
    final = client.get(task_id)
    assert final.status == "completed"
    assert final.outcomes == [{"turn": 0, "outcome": "concluded", "answer": "2 + 3 = 5."}]


def test_client_stream_ends_on_a_finished_trajectory_and_times_out_on_a_running_one(
    settings: Settings, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    client = Client(settings)
    task_id = client.submit(spec([catalog]))
    with pytest.raises(TaskTimeout):
        list(client.stream(task_id, timeout=0.4))
    finish(engine, client.get(task_id).trajectory_id)
    assert list(client.stream(task_id, timeout=0.4)) == []


def test_http_client_matches_the_client(
    live_api: str, settings: Settings, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    with HttpClient(live_api) as remote:
        task_id = remote.submit(spec([catalog]))
        assert Client(settings).get(task_id) == remote.get(task_id)
        assert remote.append_turn(task_id, "And 4 + 5?") == 2
        assert remote.get(task_id, detail=True).messages[0].content == "What is 2 + 3?"
        with pytest.raises(TimeoutError):
            remote.wait(task_id, timeout=0.4)

        trajectory_id = remote.get(task_id).trajectory_id
        engine_ops.handle_result(engine, step_id(engine, trajectory_id, 0), {"text": "Next: give up."}, settings)
        # turn 0 gave up, so the appended turn 1 starts; it is answered by a conclusion
        engine_ops.handle_result(engine, step_id(engine, trajectory_id, 1), {"text": "Next: conclusion."}, settings)
        engine_ops.handle_result(engine, step_id(engine, trajectory_id, 2), {"text": "9."}, settings)
        streamed = [(s.seq, s.kind) for s in remote.stream(task_id, timeout=5)]
        assert streamed == [(0, "planner"), (1, "planner"), (2, "summarizer")]
        assert remote.wait(task_id, timeout=5).status == "failed"  # turn 0 was not concluded

        with pytest.raises(NotFound):
            remote.get("nosuchtask")
        with pytest.raises(UnknownToolSet, match="NoSuchAPI"):
            remote.submit(spec(["NoSuchAPI"]))
        with pytest.raises(RequestRejected) as too_many:
            remote.append_turn(task_id, "a third turn")
        assert too_many.value.status_code == 422
        with pytest.raises(RequestRejected) as too_big:
            remote.submit(spec([catalog], meta={"blob": "x" * 5000}))
        assert too_big.value.status_code == 413


def test_feedback_is_stored_against_the_latest_trajectory(http: TestClient, engine: sa.Engine, catalog: str) -> None:
    task_id = http.post("/v1/tasks", json=spec([catalog])).json()["id"]
    response = http.post(f"/v1/tasks/{task_id}/feedback", json={"score": 0.75, "comment": "close"})
    assert response.status_code == 201
    trajectory_id = http.get(f"/v1/tasks/{task_id}").json()["trajectory_id"]
    with Session(engine) as session:
        row = session.get(Feedback, response.json()["id"])
    assert (row.trajectory_id, row.score, row.comment) == (trajectory_id, 0.75, "close")


@pytest.mark.parametrize("body", [{"score": 1.5}, {"score": -0.1}, {}, {"score": "good"}, {"score": 1, "extra": 1}])
def test_bad_feedback_is_422_and_stores_nothing(http: TestClient, engine: sa.Engine, catalog: str, body: dict) -> None:
    task_id = http.post("/v1/tasks", json=spec([catalog])).json()["id"]
    before = counts(engine)
    assert http.post(f"/v1/tasks/{task_id}/feedback", json=body).status_code == 422
    assert counts(engine) == before


def test_feedback_on_an_unknown_task_is_404(http: TestClient, engine: sa.Engine) -> None:
    assert http.post("/v1/tasks/nope/feedback", json={"score": 1}).status_code == 404
