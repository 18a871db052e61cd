"""The store: SQLModel tables (Postgres is the source of truth, SQLite the embedded default) and the session helper.

Every table is also the typed object the code passes around. Schema changes go through Alembic
(``orchestrator/migrations``); :func:`migrate` brings any database to head.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, Session, SQLModel, create_engine

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "alembic_config",
    "TrajectoryStatus",
    "StepStatus",
    "StepKind",
    "Task",
    "Trajectory",
    "Message",
    "Step",
    "ToolCall",
    "ToolCatalog",
    "Feedback",
    "ModelStatus",
    "ModelVersion",
    "ApiKey",
    "utcnow",
    "new_id",
    "get_engine",
    "session_scope",
    "pipelined",
    "migrate",
]

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def _json(**kw: Any) -> Any:
    return Field(sa_column=sa.Column(JSONType, nullable=False), **kw)


def _stamp() -> Any:
    return Field(default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))


def _maybe_stamp() -> Any:
    return Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True))


class TrajectoryStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class StepStatus(StrEnum):
    QUEUED = "queued"
    DONE = "done"
    DEAD = "dead"


class StepKind(StrEnum):
    """What executes a step; the value is the Celery queue that carries it."""

    PLANNER = "planner"
    CALLER = "caller"
    SUMMARIZER = "summarizer"
    TOOL = "tools"


class Task(SQLModel, table=True):
    """What a client asked for: user turns, tool sets, options. Immutable apart from appended turns."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    owner: str | None = Field(default=None, index=True, max_length=64)
    turns: list[str] = _json(default_factory=list)
    toolsets: list[str] = _json(default_factory=list)
    initial_config: dict[str, Any] = _json(default_factory=dict)
    options: dict[str, Any] = _json(default_factory=dict)
    meta: dict[str, Any] = _json(default_factory=dict)
    created_at: datetime = _stamp()


class Trajectory(SQLModel, table=True):
    """One run of the agent on a task: its status, per-turn outcomes, and the tool specs it was rendered with."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    task_id: str = Field(foreign_key="task.id", index=True, max_length=32)
    status: str = Field(default=TrajectoryStatus.RUNNING, index=True, max_length=16)
    turn: int = 0
    planner_steps: int = 0
    turn_planner_steps: int = 0
    next_seq: int = 0
    tool_specs: list[dict[str, Any]] = _json(default_factory=list)
    outcomes: list[dict[str, Any]] = _json(default_factory=list)
    failure: str | None = None
    verdict: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(JSONType, nullable=True))
    created_at: datetime = _stamp()
    updated_at: datetime = _stamp()
    finished_at: datetime | None = _maybe_stamp()


class Message(SQLModel, table=True):
    """One message of the α-UMi history (user, assistant, caller, observation, conclusion), in order."""

    __table_args__ = (sa.UniqueConstraint("trajectory_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    trajectory_id: str = Field(foreign_key="trajectory.id", max_length=32)
    seq: int
    turn: int
    speaker: str = Field(max_length=16)
    content: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    step_id: int | None = Field(default=None, foreign_key="step.id")
    created_at: datetime = _stamp()


_QUEUED_ONLY = sa.text(f"status = '{StepStatus.QUEUED}'")


class Step(SQLModel, table=True):
    """One unit of work handed to a pool: its request, its raw result, what was parsed, and what it cost.

    (trajectory_id, seq) is unique, so a trajectory's slot holds one step; ``idempotency_key`` is that pair as text,
    for logs. A redelivered or re-swept message can never store a second result: only a queued step takes one.
    Every result rewrites a step, and an update writes into each of the table's indexes, so it has only those a query
    needs (migration 0005): queued steps for the sweeper, the finish time for ``/metrics``.
    """

    __table_args__ = (
        sa.UniqueConstraint("trajectory_id", "seq"),
        sa.Index("ix_step_queued", "status", postgresql_where=_QUEUED_ONLY, sqlite_where=_QUEUED_ONLY),
        sa.Index("ix_step_finished_at", "finished_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    trajectory_id: str = Field(foreign_key="trajectory.id", max_length=32)
    seq: int
    turn: int
    kind: str = Field(max_length=16)
    status: str = Field(default=StepStatus.QUEUED, max_length=16)
    idempotency_key: str = Field(max_length=80)
    attempt: int = 0
    request: dict[str, Any] = _json(default_factory=dict)
    raw_text: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    parsed: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(JSONType, nullable=True))
    parse_error: str | None = Field(default=None, max_length=32)
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    tokens_in: int | None = None
    tokens_out: int | None = None
    latency_ms: float | None = None
    batch_size: int | None = None  # how many steps the role worker generated in the call this one ran in
    model_version: str | None = Field(default=None, max_length=128)
    worker: str | None = Field(default=None, max_length=128)
    created_at: datetime = _stamp()
    dispatched_at: datetime | None = _maybe_stamp()
    finished_at: datetime | None = _maybe_stamp()


class ToolCall(SQLModel, table=True):
    """A tool call the caller asked for and the observation it produced (hallucinated calls included, never run)."""

    id: int | None = Field(default=None, primary_key=True)
    trajectory_id: str = Field(foreign_key="trajectory.id", index=True, max_length=32)
    turn: int
    caller_step_id: int = Field(foreign_key="step.id")
    tool_step_id: int | None = Field(default=None, foreign_key="step.id")
    tool: str = Field(max_length=256)
    arguments: dict[str, Any] = _json(default_factory=dict)
    observation: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    hallucinated: bool = False
    created_at: datetime = _stamp()


class ToolCatalog(SQLModel, table=True):
    """Tool sets the tool pool can run, published by it at start: how the API validates names without importing it."""

    name: str = Field(primary_key=True, max_length=128)
    specs: list[dict[str, Any]] = _json(default_factory=list)
    stateful: bool = False
    updated_at: datetime = _stamp()


class Feedback(SQLModel, table=True):
    """A user's judgement of a trajectory (score and comment); the learning loop filters training data by it."""

    id: int | None = Field(default=None, primary_key=True)
    trajectory_id: str = Field(foreign_key="trajectory.id", index=True, max_length=32)
    score: float
    comment: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    owner: str | None = Field(default=None, max_length=64)
    created_at: datetime = _stamp()


class ModelStatus(StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    REJECTED = "rejected"
    RETIRED = "retired"


class ModelVersion(SQLModel, table=True):
    """One trained model in the registry: what it was trained from and how, how it scored, and whether it serves.

    ``hyperparameters`` holds the GLPFT config the version was trained with, so it can be reproduced from its record.
    At most one version per role is ``active``; role workers configured with ``model=registry`` serve it.
    """

    id: str = Field(primary_key=True, max_length=128)
    role: str = Field(index=True, max_length=16)
    parent: str | None = Field(default=None, max_length=128)
    path: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    data_snapshot: dict[str, Any] = _json(default_factory=dict)
    hyperparameters: dict[str, Any] = _json(default_factory=dict)
    metrics: dict[str, Any] = _json(default_factory=dict)
    status: str = Field(default=ModelStatus.CANDIDATE, index=True, max_length=16)
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    created_at: datetime = _stamp()
    promoted_at: datetime | None = _maybe_stamp()


class ApiKey(SQLModel, table=True):
    """A key of the HTTP API: only its SHA-256 digest is stored (orchestrator.auth), never the key itself.

    ``owner`` scopes what the key sees: the tasks it creates carry it, and it reads only tasks that do, so several
    keys of one owner (a rotation) share their tasks. ``rate_limit_per_min`` overrides UMIQ_API_RATE_LIMIT_PER_MIN.
    """

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)
    owner: str = Field(index=True, max_length=64)
    prefix: str = Field(index=True, max_length=16)
    hash: str = Field(unique=True, max_length=64)
    rate_limit_per_min: int | None = None
    created_at: datetime = _stamp()
    revoked_at: datetime | None = _maybe_stamp()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


PING_AFTER_IDLE_S = 1.0
"""A pooled connection idle longer than this is pinged before use; one in steady use is not (see :func:`get_engine`)."""


def _ping_when_idle(engine: sa.Engine) -> None:
    """Pessimistic disconnect handling for connections that sat idle, at no cost to connections in steady use.

    ``pool_pre_ping`` pings on every checkout: with psycopg that is a BEGIN and a ``SELECT 1``, two round trips and
    about a fifth of the orchestrator's database CPU per step result. A server restart or an idle timeout shows up
    on connections that sat in the pool, so only those are pinged here (a failed ping raises ``DisconnectionError``,
    on which the pool discards the connection and checks out a fresh one). A connection that breaks while in steady
    use fails its statement with an ``OperationalError``: the engine invalidates the whole pool on it, and the
    orchestrator's tasks retry on exactly that error (``orchestrator.tasks``), as they did before when the database
    went away mid-transaction.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["umiq_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("umiq_idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
            dbapi_connection.rollback()  # the ping opened a transaction; hand the connection over without one
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"pooled connection failed its ping: {exc!r}") from exc


@lru_cache(maxsize=8)
def get_engine(url: str) -> sa.Engine:
    """One engine per URL per process; SQLite gets WAL and a busy timeout because several processes share it.

    Postgres connections are pinged only after sitting idle (:func:`_ping_when_idle`), not on every checkout, and
    recycled hourly so no connection outlives a server-side idle limit by much.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_size=5, max_overflow=10, pool_recycle=3600)
    _ping_when_idle(engine)
    return engine


@contextmanager
def session_scope(engine: sa.Engine) -> Iterator[Session]:
    """A short transaction: commit on success, roll back on any error. Objects stay usable after commit."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def pipelined(conn: sa.Connection) -> Iterator[None]:
    """Send the statements run inside together and wait for the server once, at the end (psycopg's pipeline mode).

    A step result's writes (the step, its messages, the tool call, the trajectory) need nothing back from the server,
    yet each cost a round trip: a send, a wait and a receive, in the orchestrator and in Postgres. Pipelined, they cost
    one. Only statements whose results nobody reads may run inside: an ``INSERT`` must be ``.inline()`` (no
    ``RETURNING`` of its key), and a ``SELECT`` would see no rows. A failed statement raises at the end, as the
    SQLAlchemy error its psycopg error maps to, so callers (the retrying orchestrator tasks) see what they would have
    seen outside; a broken connection is invalidated, not returned to the pool. SQLite has no round trips to save:
    the statements just run.
    """
    driver = conn.connection.driver_connection
    if not hasattr(driver, "pipeline"):
        yield
        return
    import psycopg

    try:
        with driver.pipeline():
            yield
    except psycopg.Error as exc:
        if isinstance(exc, psycopg.OperationalError) or driver.closed:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=conn.invalidated) from exc


def alembic_config(url: str) -> Config:
    """Alembic's configuration for umiq's migrations on the database at ``url`` (no alembic.ini to find)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    return config


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest Alembic revision (creates it from nothing on first use)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
