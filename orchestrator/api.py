"""The HTTP API: how backend services in any process or language enqueue agent tasks and read their progress.

A thin layer over :mod:`orchestrator.views` and the engine: it authenticates (:mod:`orchestrator.auth`), rate-limits,
validates, sizes and scopes requests, and maps the engine's errors to status codes with ``{"detail": ...}`` bodies.
Request bodies and headers are never logged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import sqlalchemy as sa
import structlog
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlmodel import Session

from orchestrator import auth, monitoring, queues, store, views
from orchestrator import engine as engine_ops
from orchestrator.engine import NotFound, TooManyTurns, UnknownToolSet
from orchestrator.schemas import FeedbackSpec, StepView, TaskSpec, TaskView, TurnSpec
from orchestrator.settings import Settings, get_settings
from orchestrator.store import TrajectoryStatus

__all__ = ["create_app", "request_owner", "TaskCreated", "TurnAccepted", "TaskPage", "BodyLimit"]

log = structlog.get_logger(__name__)

Scope = dict[str, Any]
ASGIMessage = dict[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TaskCreated(BaseModel):
    id: str


class TurnAccepted(BaseModel):
    id: str
    turns: int


class TaskPage(BaseModel):
    """One page of tasks, newest first; ``limit`` and ``offset`` echo the request so a caller can page on."""

    items: list[TaskView]
    limit: int
    offset: int


# ---------------------------------------------------------------------------------------------------- body limit


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` before anything parses them.

    A declared Content-Length is checked first; the body is then read, counted chunk by chunk (chunked uploads
    declare no length, and a client may lie), and replayed to the app only if it fits.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.strip().isdigit():
            await _error(scope, send, status.HTTP_400_BAD_REQUEST, "Content-Length is not a number")
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self._refuse(scope, send, "declared")
            return
        body = await self._read(receive)
        if body is None:
            await self._refuse(scope, send, "streamed")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, send: Send, how: str) -> None:
        log.warning("api.body_too_large", how=how, limit=self.max_bytes)
        detail = f"request body exceeds the limit of {self.max_bytes} bytes"
        await _error(scope, send, status.HTTP_413_CONTENT_TOO_LARGE, detail)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body over once, then pass through (the server's disconnect notice)."""
    sent = False

    async def replay() -> ASGIMessage:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _error(scope: Scope, send: Send, code: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=code)(scope, _no_receive, send)


async def _no_receive() -> ASGIMessage:
    return {"type": "http.disconnect"}


# ---------------------------------------------------------------------------------------------------- dependencies


_bearer = HTTPBearer(auto_error=False, description="An API key from `umiq keys create`, as a bearer token.")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key from `umiq keys create`.")


def _unauthorized(reason: str, *, presented: bool) -> HTTPException:
    """RFC 6750: a challenge naming the realm, with ``invalid_token`` only when a key was presented."""
    challenge = 'Bearer realm="umiq"' + (', error="invalid_token"' if presented else "")
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=reason, headers={"WWW-Authenticate": challenge})


def request_owner(
    request: Request,
    response: Response,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_key_header)],
) -> str | None:
    """Whose tasks a request may see: its API key's owner, or ``None`` (every task) with UMIQ_API_AUTH=off.

    A missing, unknown or revoked key is a 401 and a key over its rate limit a 429, before the route runs. The key
    itself is never logged.
    """
    settings: Settings = request.app.state.settings
    if not settings.api_auth:
        return None
    presented = {key for key in (bearer.credentials if bearer else None, header_key) if key}
    if len(presented) > 1:
        raise _unauthorized("the Authorization and X-API-Key headers carry different keys", presented=True)
    try:
        key = auth.authenticate(request.app.state.engine, next(iter(presented), None))
    except auth.AuthError as exc:
        log.info("api.unauthorized", reason=exc.reason, path=request.url.path)
        raise _unauthorized(exc.reason, presented=bool(presented)) from None
    limit = settings.api_rate_limit_per_min if key.rate_limit_per_min is None else key.rate_limit_per_min
    if limit:
        verdict = request.app.state.rate_limiter.hit(key.hash, limit)
        if not verdict.allowed:
            log.info("api.rate_limited", key_id=key.id, limit=limit, retry_after_s=verdict.retry_after_s)
            detail = f"rate limit of {limit} requests per minute exceeded; retry in {verdict.retry_after_s} s"
            headers = {"Retry-After": str(verdict.retry_after_s)}
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=detail, headers=headers)
        response.headers["X-RateLimit-Limit"] = str(limit)
        response.headers["X-RateLimit-Remaining"] = str(verdict.remaining)
    return key.owner


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _engine(request: Request) -> sa.Engine:
    return request.app.state.engine


DB = Annotated[sa.Engine, Depends(_engine)]


def _session(db: DB) -> Iterator[Session]:
    with store.session_scope(db) as session:
        yield session


Owner = Annotated[str | None, Depends(request_owner)]
Reader = Annotated[Session, Depends(_session)]
Config = Annotated[Settings, Depends(_settings)]

# -------------------------------------------------------------------------------------------------------- errors


def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's error list without the rejected input, which may be large or private."""
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
    return JSONResponse({"detail": f"task {exc.args[0]} not found"}, status_code=status.HTTP_404_NOT_FOUND)


def _unknown_tool_set(_request: Request, exc: UnknownToolSet) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_400_BAD_REQUEST)


def _too_many_turns(_request: Request, exc: TooManyTurns) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _unstorable_value(_request: Request, exc: sa.exc.DataError) -> JSONResponse:
    """Postgres refuses some values a request can carry (a NUL character in text or JSON): the request's fault, a 422."""
    log.warning("api.unstorable_value", error=type(exc.orig).__name__)
    detail = "the request holds a value the store cannot keep (such as a NUL character)"
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _store_unavailable(_request: Request, exc: sa.exc.OperationalError) -> JSONResponse:
    log.warning("api.store_unavailable", error=type(exc.orig).__name__)
    detail = "the store is unavailable; retry later"
    return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


# -------------------------------------------------------------------------------------------------------- routes


router = APIRouter()



@router.post("/v1/tasks", status_code=status.HTTP_201_CREATED, response_model=TaskCreated, tags=["tasks"])
def submit(spec: TaskSpec, db: DB, settings: Config, owner: Owner) -> TaskCreated:
    """Enqueue a task: the task, its trajectory and first planner step are stored together, or not at all."""
    return TaskCreated(id=engine_ops.submit(db, spec, settings, owner=owner).id)


@router.post(
    "/v1/tasks/{task_id}/turns", status_code=status.HTTP_202_ACCEPTED, response_model=TurnAccepted, tags=["tasks"]
)
def append_turn(task_id: str, turn: TurnSpec, db: DB, settings: Config, owner: Owner) -> TurnAccepted:
    """Continue a task with another user turn; it runs once the current turns have finished."""
    return TurnAccepted(id=task_id, turns=len(engine_ops.append_turn(db, task_id, turn.text, settings, owner=owner).turns))


class FeedbackAccepted(BaseModel):
    id: int


@router.post(
    "/v1/tasks/{task_id}/feedback", status_code=status.HTTP_201_CREATED, response_model=FeedbackAccepted, tags=["tasks"]
)
def add_feedback(task_id: str, feedback: FeedbackSpec, db: DB, owner: Owner) -> FeedbackAccepted:
    """Score a task's trajectory (0 to 1, with an optional comment) for the learning loop."""
    return FeedbackAccepted(id=engine_ops.add_feedback(db, task_id, feedback.score, feedback.comment, owner=owner))


@router.get("/v1/tasks/{task_id}", response_model=TaskView, tags=["tasks"])
def get_task(task_id: str, session: Reader, owner: Owner) -> TaskView:
    return views.task_view(session, task_id, owner=owner)


@router.get("/v1/tasks/{task_id}/trajectory", response_model=TaskView, tags=["tasks"])
def get_trajectory(task_id: str, session: Reader, owner: Owner) -> TaskView:
    """The status plus every message and step, queued ones included."""
    return views.task_view(session, task_id, owner=owner, detail=True)


@router.get("/v1/tasks/{task_id}/steps", response_model=list[StepView], tags=["tasks"])
def get_steps(
    task_id: str, session: Reader, owner: Owner, after_seq: Annotated[int, Query(ge=-1)] = -1
) -> list[StepView]:
    """Finished steps after ``after_seq``: what a remote client polls to stream a trajectory."""
    view = views.task_view(session, task_id, owner=owner)
    return views.steps_since(session, view.trajectory_id, after_seq)


@router.get("/v1/tasks", response_model=TaskPage, tags=["tasks"])
def list_tasks(
    session: Reader,
    owner: Owner,
    status_: Annotated[TrajectoryStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> TaskPage:
    items = views.list_tasks(session, owner=owner, status=status_, limit=limit, offset=offset)
    return TaskPage(items=items, limit=limit, offset=offset)


@router.get("/healthz", tags=["ops"])
def healthz(db: DB) -> JSONResponse:
    """Ready when the store answers; load balancers and compose health checks poll this."""
    try:
        with db.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        log.warning("api.unhealthy", error=type(exc).__name__)
        return JSONResponse({"detail": "database unreachable"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", tags=["ops"], response_class=Response)
def metrics(db: DB, settings: Config) -> Response:
    """Prometheus metrics from the broker and the store: queue depth per pool; latency, tokens/s, batch size per role.

    Aggregates only, no task content, so no API key and no owner scoping: scrapers have no key (serve it inside).
    """
    return Response(monitoring.render(db, settings), media_type=monitoring.CONTENT_TYPE)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings``; the store is migrated when the app starts, not when it is built."""
    settings = settings or get_settings()
    queues.configure(settings)  # the engine publishes through the process-wide Celery app
    url = settings.resolved_database_url

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        store.migrate(url)
        log.info("api.started", embedded=settings.embedded, max_body_bytes=settings.api_max_body_bytes, auth=settings.api_auth)
        if not settings.api_auth:
            log.warning("api.auth_off", detail="UMIQ_API_AUTH is off: no API key needed, every task visible to every caller")
        yield

    app = FastAPI(
        title="umiq",
        summary="Enqueue α-UMi agent tasks and read their trajectories.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = store.get_engine(url)
    app.state.rate_limiter = auth.rate_limiter(settings)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(UnknownToolSet, _unknown_tool_set)
    app.add_exception_handler(TooManyTurns, _too_many_turns)
    app.add_exception_handler(sa.exc.OperationalError, _store_unavailable)
    app.add_exception_handler(sa.exc.DataError, _unstorable_value)
    app.include_router(router)
    return app
