"""Requests generated from the API's own OpenAPI schema (schemathesis, in process over ASGI) never get a 5xx.

Valid and invalid requests alike, each with a valid API key, against the real Postgres and Redis of the test
session. Examples per operation are capped so the whole run stays within seconds on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import schemathesis
import sqlalchemy as sa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from orchestrator import auth, queues
from orchestrator.api import create_app, router
from orchestrator.settings import Settings

__all__: list[str] = []

EXAMPLES = settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def token(engine: sa.Engine) -> str:
    """A key without a rate limit: a 429 would hide what the request itself does."""
    return auth.create_key(engine, "schemathesis", rate_limit_per_min=0)[1]


@pytest.fixture(scope="module")
def api_schema(settings: Settings, engine: sa.Engine, redis_url: str) -> Iterator[schemathesis.BaseSchema]:
    """The schema as the app serves it; generated tasks are published to Redis, so umiq's queues are emptied after."""
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))
    with redis.Redis.from_url(redis_url) as client:
        client.delete(*queues.QUEUES)


ROUTES = sorted((method, route.path) for route in router.routes if isinstance(route, APIRoute) for method in route.methods)
"""Every operation of the API, known at collection (schemathesis' lazy ``from_fixture`` loader fails on pytest 9)."""


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_no_generated_request_gets_a_server_error(
    api_schema: schemathesis.BaseSchema, token: str, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    valid, invalid = (operation.as_strategy(generation_mode=mode) for mode in GenerationMode)

    @EXAMPLES
    @given(case=st.one_of(valid, invalid))
    def call(case: schemathesis.Case) -> None:
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        case.validate_response(response, checks=[not_a_server_error])

    call()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/v1/tasks", {"turns": ["\u0000"]}), ("POST", "/v1/tasks", {"turns": ["hi"], "meta": {"k": "a\u0000"}}),
     ("GET", "/v1/tasks/%00", None)],
)
def test_a_nul_character_is_a_422_not_a_500(
    settings: Settings, token: str, method: str, path: str, body: dict[str, object] | None
) -> None:
    """What this test first found: Postgres keeps no NUL in text or JSONB, and the refusal surfaced as a 500."""
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as client:
        response = client.request(method, path, json=body)
    assert response.status_code == 422
    assert response.json() == {"detail": "the request holds a value the store cannot keep (such as a NUL character)"}
