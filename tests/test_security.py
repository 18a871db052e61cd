"""API keys, owner isolation, per-key rate limits and secret-free logs, on real Postgres and Redis and a real server."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
import sqlalchemy as sa
import structlog
from click.testing import Result
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select
from typer.testing import CliRunner

from orchestrator import auth
from orchestrator.api import create_app
from orchestrator.cli import app as cli
from orchestrator.client import HttpClient
from orchestrator.logs import setup_logging
from orchestrator.settings import Settings
from orchestrator.store import ApiKey, Task
from tests.live_server import free_port, serve

__all__: list[str] = []

TASK = {"turns": ["What is 2 + 3?"]}
TASK_ROUTES = [
    ("GET", "/v1/tasks/{id}", None),
    ("GET", "/v1/tasks/{id}/trajectory", None),
    ("GET", "/v1/tasks/{id}/steps", None),
    ("POST", "/v1/tasks/{id}/turns", {"text": "more"}),
    ("POST", "/v1/tasks/{id}/feedback", {"score": 1}),
]


def issue(engine: sa.Engine, owner: str, *, rate: int | None = None) -> str:
    _key, token = auth.create_key(engine, f"{owner}-key", owner=owner, rate_limit_per_min=rate)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tasks_stored(engine: sa.Engine) -> int:
    with Session(engine) as session:
        return session.exec(select(func.count()).select_from(Task)).one()


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


@pytest.fixture
def app(settings: Settings, engine: sa.Engine) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def http(app: FastAPI) -> Iterator[TestClient]:
    """A client that sends no key unless a test gives one."""
    with TestClient(app) as client:
        yield client


def reset_logging() -> None:
    """Undo ``setup_logging``, whose handler writes to a stream that is gone once a test or a CLI run is over."""
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def umiq(*args: str) -> Result:
    """Run the ``umiq`` command in process, as a shell would (stdout and stderr apart)."""
    try:
        return CliRunner().invoke(cli, list(args))
    finally:
        reset_logging()


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log line of this process (structlog and the standard library, DEBUG and up) as JSON, in memory."""
    stream = io.StringIO()
    setup_logging(Settings(log_format="json", log_level="DEBUG"), stream=stream)
    yield stream
    reset_logging()


@pytest.fixture
def live_api(app: FastAPI) -> Iterator[str]:
    """The keyed API under a real uvicorn server, its logs routed through umiq's (log_config=None, as `umiq api`)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # as in a fresh process: an earlier server's
        logging.getLogger(name).handlers.clear()  # dictConfig (tests/test_api.py) stops them propagating
        logging.getLogger(name).propagate = True
    with serve(app, log_config=None, log_level="debug") as url:
        yield url


# ------------------------------------------------------------------------------------------------------------ keys


def test_a_key_is_stored_only_as_its_hash(engine: sa.Engine) -> None:
    key, token = auth.create_key(engine, "billing", owner="team-billing", rate_limit_per_min=5)
    assert re.fullmatch(r"umiq_[A-Za-z0-9_-]{43}", token)
    with Session(engine) as session:
        row = session.get(ApiKey, key.id)
    assert row.hash == hashlib.sha256(token.encode()).hexdigest()
    assert (row.name, row.owner, row.prefix, row.rate_limit_per_min) == ("billing", "team-billing", token[:13], 5)
    assert token not in json.dumps(row.model_dump(mode="json"))
    assert auth.authenticate(engine, token).id == key.id
    assert auth.create_key(engine, "billing")[1] != token
    with pytest.raises(ValueError, match="name"):
        auth.create_key(engine, "  ")
    with pytest.raises(ValueError, match="owner"):
        auth.create_key(engine, "x", owner="o" * 65)


@pytest.mark.usefixtures("settings")
def test_cli_creates_lists_and_revokes_keys(engine: sa.Engine, http: TestClient) -> None:
    owner = unique("cli")
    created = umiq("keys", "create", "reporting", "--owner", owner, "--rate-limit", "100")
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert re.fullmatch(r"umiq_[A-Za-z0-9_-]{43}", token), created.stdout
    assert "not shown again" in created.stderr and token not in created.stderr
    [key] = [k for k in auth.list_keys(engine) if k.owner == owner]
    assert http.get("/v1/tasks", headers=bearer(token)).status_code == 200

    listed = umiq("keys", "list")
    assert listed.exit_code == 0, listed.output
    assert f"{key.prefix}…" in listed.stdout
    assert token not in listed.output and key.hash not in listed.output

    revoked = umiq("keys", "revoke", str(key.id))
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    refused = http.get("/v1/tasks", headers=bearer(token))
    assert (refused.status_code, refused.json()) == (401, {"detail": "API key revoked"})
    assert umiq("keys", "revoke", "999999").exit_code == 1


# ----------------------------------------------------------------------------------------------------------- 401


@pytest.mark.parametrize(
    ("headers", "detail", "presented"),
    [
        ({}, "missing API key", False),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing API key", False),
        ({"Authorization": "Bearer "}, "missing API key", False),
        ({"Authorization": "Bearer not-a-umiq-key"}, "invalid API key", True),
        ({"X-API-Key": "umiq_" + "A" * 43}, "invalid API key", True),
        ({"X-API-Key": "umiq_" + "A" * 400}, "invalid API key", True),
    ],
)
def test_requests_without_a_valid_key_are_401_and_store_nothing(
    http: TestClient, engine: sa.Engine, headers: dict[str, str], detail: str, presented: bool
) -> None:
    before = tasks_stored(engine)
    for method, path, body in [("GET", "/v1/tasks", None), ("POST", "/v1/tasks", TASK), ("GET", "/v1/tasks/abc", None)]:
        response = http.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.json()["detail"].startswith(detail)
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="umiq"') and ('error="invalid_token"' in challenge) is presented
    assert tasks_stored(engine) == before


def test_revoked_and_conflicting_keys_are_401(http: TestClient, engine: sa.Engine) -> None:
    key, token = auth.create_key(engine, unique("revoked"))
    assert http.get("/v1/tasks", headers=bearer(token)).status_code == 200
    auth.revoke_key(engine, key.id)
    first_revocation = auth.revoke_key(engine, key.id).revoked_at
    assert auth.revoke_key(engine, key.id).revoked_at == first_revocation
    response = http.get("/v1/tasks", headers={"X-API-Key": token})
    assert (response.status_code, response.json()["detail"]) == (401, "API key revoked")
    other = issue(engine, unique("other"))
    both = http.get("/v1/tasks", headers={**bearer(other), "X-API-Key": token})
    assert both.status_code == 401 and "different keys" in both.json()["detail"]


def test_either_header_carries_a_key_and_ops_routes_stay_open(http: TestClient, engine: sa.Engine) -> None:
    token = issue(engine, unique("headers"))
    assert http.get("/v1/tasks", headers=bearer(token)).status_code == 200
    assert http.get("/v1/tasks", headers={"X-API-Key": token}).status_code == 200
    assert http.get("/v1/tasks", headers={**bearer(token), "X-API-Key": token}).status_code == 200
    assert http.get("/healthz").status_code == 200
    assert http.get("/metrics").status_code == 200  # scrapers carry no key; no metric names a task or an owner
    assert http.get("/docs").status_code == 200
    schema = http.get("/openapi.json").json()
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
    assert schema["paths"]["/v1/tasks"]["post"]["security"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


# ---------------------------------------------------------------------------------------------- owner isolation


@pytest.mark.usefixtures("redis_queues")
def test_a_key_sees_only_its_owners_tasks(http: TestClient, engine: sa.Engine) -> None:
    owner = unique("alice")
    alice, alice_rotated, bob = issue(engine, owner), issue(engine, owner), issue(engine, unique("bob"))
    task_id = http.post("/v1/tasks", json=TASK, headers=bearer(alice)).json()["id"]
    with Session(engine) as session:
        assert session.get(Task, task_id).owner == owner

    assert http.get(f"/v1/tasks/{task_id}", headers=bearer(alice)).status_code == 200
    assert http.get(f"/v1/tasks/{task_id}", headers=bearer(alice_rotated)).status_code == 200
    before = tasks_stored(engine)
    for method, path, body in TASK_ROUTES:
        theirs = http.request(method, path.format(id=task_id), json=body, headers=bearer(bob))
        missing = http.request(method, path.format(id="nosuchtask"), json=body, headers=bearer(bob))
        assert theirs.status_code == missing.status_code == 404, path
        assert theirs.json() == {"detail": f"task {task_id} not found"}
        assert missing.json() == {"detail": "task nosuchtask not found"}
    assert tasks_stored(engine) == before
    assert http.get(f"/v1/tasks/{task_id}", headers=bearer(alice)).json()["turns"] == TASK["turns"]

    assert [t["id"] for t in http.get("/v1/tasks", headers=bearer(alice)).json()["items"]] == [task_id]
    assert http.get("/v1/tasks", headers=bearer(bob)).json()["items"] == []


@pytest.mark.usefixtures("redis_queues")
def test_auth_off_needs_no_key_and_sees_every_task(settings: Settings, engine: sa.Engine) -> None:
    token = issue(engine, unique("keyed"))
    with TestClient(create_app(settings.model_copy(update={"api_auth": False}))) as open_api:
        with TestClient(create_app(settings)) as keyed_api:
            task_id = keyed_api.post("/v1/tasks", json=TASK, headers=bearer(token)).json()["id"]
        assert open_api.get(f"/v1/tasks/{task_id}").status_code == 200
        assert task_id in [t["id"] for t in open_api.get("/v1/tasks", params={"limit": 500}).json()["items"]]


# ------------------------------------------------------------------------------------------------------ rate limit


def test_a_key_over_its_limit_gets_429_with_retry_after(http: TestClient, engine: sa.Engine, redis_url: str) -> None:
    key, token = auth.create_key(engine, unique("limited"), rate_limit_per_min=3)
    other = issue(engine, unique("unlimited"))
    remaining = [http.get("/v1/tasks", headers=bearer(token)).headers["x-ratelimit-remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    refused = http.get("/v1/tasks", headers=bearer(token))
    assert refused.status_code == 429
    assert refused.json() == {"detail": f"rate limit of 3 requests per minute exceeded; retry in {refused.headers['retry-after']} s"}
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert http.get("/v1/tasks", headers=bearer(other)).status_code == 200
    with redis.Redis.from_url(redis_url) as client:
        counter = f"umiq:ratelimit:{key.hash}"
        assert int(client.get(counter)) == 4
        assert 0 < client.pttl(counter) <= 60_000  # INCR and PEXPIRE ran together: no counter outlives its window


@pytest.mark.usefixtures("redis_queues")
def test_the_default_limit_applies_to_keys_without_their_own(settings: Settings, engine: sa.Engine) -> None:
    token = issue(engine, unique("default-limit"))
    free = issue(engine, unique("no-limit"), rate=0)
    with TestClient(create_app(settings.model_copy(update={"api_rate_limit_per_min": 2}))) as client:
        assert [client.get("/v1/tasks", headers=bearer(token)).status_code for _ in range(3)] == [200, 200, 429]
        assert {client.get("/v1/tasks", headers=bearer(free)).status_code for _ in range(4)} == {200}
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("kind", ["redis", "local"])
def test_a_window_reopens_when_it_ends(kind: str, redis_url: str) -> None:
    limiter = auth.RedisRateLimiter(redis_url, window_s=0.5) if kind == "redis" else auth.LocalRateLimiter(window_s=0.5)
    bucket = unique("window")
    verdicts = [limiter.hit(bucket, 2) for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, True, False]
    assert [v.remaining for v in verdicts] == [1, 0, 0] and verdicts[2].retry_after_s == 1
    assert limiter.hit(unique("another"), 2).allowed
    time.sleep(0.6)
    assert limiter.hit(bucket, 2) == auth.Verdict(allowed=True, remaining=1, retry_after_s=1)


def test_the_limiter_follows_the_broker_and_lets_requests_through_when_redis_is_down(settings: Settings) -> None:
    assert isinstance(auth.rate_limiter(settings), auth.RedisRateLimiter)
    assert isinstance(auth.rate_limiter(settings.model_copy(update={"broker_url": ""})), auth.LocalRateLimiter)
    down = auth.RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0")
    assert down.hit("any", 1).allowed and down.hit("any", 1).allowed


# -------------------------------------------------------------------------------------------------------- logging


def test_redaction_scrubs_keys_wherever_a_caller_puts_them(json_logs: io.StringIO) -> None:
    token = auth.new_token()
    logger = structlog.get_logger("umiq.test")
    logger.info("headers", headers={"Authorization": f"Bearer {token}", "X-API-Key": token, "accept": "*/*"})
    logger.info("asgi", raw=[(b"authorization", f"Bearer {token}".encode()), (b"x-api-key", token.encode())])
    logger.info(f"presented {token} and Authorization: Bearer {token}", prefix=auth.display_prefix(token))
    logging.getLogger("library").warning("header was %s", f"Bearer {token}")
    output = json_logs.getvalue()
    assert token not in output and token[13:] not in output
    events = [json.loads(line) for line in output.splitlines()]
    assert events[0]["headers"] == {"Authorization": "***", "X-API-Key": "***", "accept": "*/*"}
    assert events[2]["prefix"] == auth.display_prefix(token)  # the display prefix is no secret and stays readable
    assert events[3]["event"] == "header was Bearer ***"


@pytest.mark.usefixtures("redis_queues")
def test_keys_never_reach_the_logs_of_a_real_server(
    live_api: str, engine: sa.Engine, json_logs: io.StringIO
) -> None:
    owner = unique("live")
    token, limited = issue(engine, owner), issue(engine, unique("live-limited"), rate=1)
    revoked_key, revoked = auth.create_key(engine, unique("live-revoked"))
    auth.revoke_key(engine, revoked_key.id)
    unknown = auth.new_token()
    with httpx.Client(base_url=live_api, headers=bearer(token), timeout=10) as keyed:
        task_id = keyed.post("/v1/tasks", json=TASK).json()["id"]
        with HttpClient(live_api, http=keyed) as remote:
            assert remote.get(task_id).turns == TASK["turns"]
        assert keyed.get("/v1/tasks", headers={"Authorization": "", "X-API-Key": token}).status_code == 200
    anonymous = httpx.get(f"{live_api}/v1/tasks/{task_id}")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == 'Bearer realm="umiq"'
    stranger = httpx.get(f"{live_api}/v1/tasks/{task_id}", headers=bearer(issue(engine, unique("stranger"))))
    assert stranger.status_code == 404
    assert httpx.get(f"{live_api}/v1/tasks", headers=bearer(unknown)).status_code == 401
    assert httpx.get(f"{live_api}/v1/tasks", headers={"X-API-Key": revoked}).status_code == 401
    statuses = [httpx.get(f"{live_api}/v1/tasks", headers=bearer(limited)).status_code for _ in range(2)]
    assert statuses == [200, 429]

    output = json_logs.getvalue()
    events = {json.loads(line)["event"] for line in output.splitlines()}
    assert {"task.submitted", "api.unauthorized", "api.rate_limited"} <= events  # the capture saw the requests
    assert any("GET /v1/tasks" in event for event in events)  # uvicorn's access log went through it too
    for secret in (token, limited, revoked, unknown):
        assert secret not in output and secret[13:] not in output
