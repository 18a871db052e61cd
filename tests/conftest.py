"""Shared fixtures: real Postgres and Redis (never mocked), a fresh database per session, settings pointing at both.

Fixtures for other test files: ``pg_url`` (a new, empty database, dropped afterwards; ``scratch_pg_url`` is one per
test), ``redis_url``, ``settings`` (UMIQ_* environment applied, settings cache and Celery app reconfigured),
``engine`` (migrated), ``catalog`` (a toy tool set in the store's catalogue), ``redis_queues`` (a Redis client;
umiq's queues emptied before and after) and ``api_key`` (a fresh API key with an owner of its own).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy as sa
from psycopg import sql
from sqlmodel import Session

from orchestrator import auth, queues, store
from orchestrator.settings import Settings, get_settings

__all__ = ["PG_URL", "REDIS_BASE", "TOY_TOOLSET", "TOY_SPECS"]

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_BASE = "redis://127.0.0.1:6379"
_REDIS_LOCK = "umiq:test-session"
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'

TOY_TOOLSET = "toy_math"
TOY_SPECS: list[dict[str, Any]] = [
    {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
    {
        "name": "echo",
        "description": "Return the text it is given.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
]


def _libpq(url: str | sa.URL) -> str:
    """psycopg wants a plain libpq URL, without SQLAlchemy's ``+psycopg`` driver suffix."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(_libpq(PG_URL), autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        error = exc
    pytest.fail(f"Postgres is not reachable at {PG_URL} ({error}).\nStart it with: {PG_START}", pytrace=False)


@contextmanager
def _fresh_database() -> Iterator[str]:
    """A uniquely named, empty database, dropped (connections and all) afterwards."""
    name = f"umiq_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        store.get_engine(url).dispose()
        with _admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The test session's database."""
    with _fresh_database() as url:
        yield url


@pytest.fixture
def scratch_pg_url() -> Iterator[str]:
    """A database of one test's own, for what would disturb the session's (its schema migrated down and up)."""
    with _fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database index this session holds alone (a lock key claims it), so that two test sessions on one
    machine never consume each other's steps; it is emptied before and after."""
    try:
        url = _claim_redis_db()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_BASE} ({exc}).\nStart it with: {REDIS_START}", pytrace=False)
    yield url
    with redis.Redis.from_url(url) as client:
        client.flushdb()


def _claim_redis_db() -> str:
    for index in range(1, 16):
        url = f"{REDIS_BASE}/{index}"
        with redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3) as client:
            if client.set(_REDIS_LOCK, os.getpid(), nx=True, ex=3 * 3600):
                for key in client.scan_iter():
                    if key != _REDIS_LOCK.encode():
                        client.delete(key)
                return url
    pytest.fail(f"every Redis database 1-15 at {REDIS_BASE} is held by another test session", pytrace=False)


@pytest.fixture(scope="session")
def settings(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """umiq's settings as a deployed process would read them: from UMIQ_* variables."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("UMIQ_DATABASE_URL", pg_url)
        env.setenv("UMIQ_BROKER_URL", redis_url)
        env.setenv("UMIQ_HOME", str(tmp_path_factory.mktemp("umiq_home")))
        get_settings.cache_clear()
        queues.configure()
        yield get_settings()
    get_settings.cache_clear()
    queues.configure()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """UMIQ_MODEL_CACHE reuses converted models across runs; otherwise each session converts once into a temp dir."""
    configured = os.environ.get("UMIQ_MODEL_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def engine(settings: Settings) -> sa.Engine:
    store.migrate(settings.resolved_database_url)
    return store.get_engine(settings.resolved_database_url)


@pytest.fixture
def clean_registry(engine: sa.Engine) -> sa.Engine:
    """No model versions: every role serves its base model, whatever earlier tests of the session registered."""
    with Session(engine) as session:
        session.execute(sa.delete(store.ModelVersion))
        session.commit()
    return engine


@pytest.fixture
def catalog(engine: sa.Engine) -> str:
    """Publish the toy tool set as a tool pool would at start; returns its name."""
    with Session(engine) as session:
        session.merge(store.ToolCatalog(name=TOY_TOOLSET, specs=TOY_SPECS, updated_at=store.utcnow()))
        session.commit()
    return TOY_TOOLSET


@pytest.fixture
def redis_queues(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the broker with umiq's queues emptied, so a test can count exactly what it published."""
    client = redis.Redis.from_url(redis_url)
    client.delete(*queues.QUEUES)
    yield client
    client.delete(*queues.QUEUES)
    client.close()


@pytest.fixture
def api_key(engine: sa.Engine) -> str:
    """A new API key whose owner is unique to the test, so the test sees exactly the tasks it created."""
    _key, token = auth.create_key(engine, f"test-{uuid.uuid4().hex[:12]}")
    return token
