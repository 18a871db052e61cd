"""The role task: take a rendered prompt off the role's queue, generate, and hand the text back to the orchestrator.

A role worker is a stateless model server (vLLM's split: the orchestrator decides, the worker runs the model). It
never reads or writes trajectory state. The model loads once per worker process, in a worker signal, not at
import. The pool runs Celery's threads pool: every task thread hands its request to the process's one
:class:`~workers.batching.Batcher`, which generates the steps that arrive together in one call on the one model.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import sqlalchemy.exc
import structlog
from sqlmodel import select
from celery.signals import worker_init, worker_process_init

from orchestrator.logs import bind_step
from orchestrator.protocol import ModelRole, Prompt
from orchestrator.queues import STEP_RESULT, app, generate_task_name, send
from orchestrator.settings import REGISTRY, Settings, get_settings
from orchestrator.store import ModelStatus, ModelVersion, get_engine, session_scope
from workers.backends.base import Backend, GenerationRequest
from workers.backends.factory import load_backend
from workers.batching import Batcher

__all__ = ["serve_role", "backend", "batcher"]

log = structlog.get_logger(__name__)

_role: ModelRole | None = None
_backend: Backend | None = None
_serving: str | None = None
_checked_at = 0.0
_batcher: Batcher | None = None
_batcher_lock = threading.Lock()


def serve_role(role: ModelRole) -> None:
    """Declare which role this process serves; the backend loads when the worker starts."""
    global _role
    _role = role


def _active_version_path(settings: Settings, role: ModelRole) -> str | None:
    engine = get_engine(settings.resolved_database_url)
    with session_scope(engine) as session:
        return session.exec(
            select(ModelVersion.path).where(ModelVersion.role == role.value, ModelVersion.status == ModelStatus.ACTIVE)
        ).one_or_none()


def _wanted_model(settings: Settings, role: ModelRole) -> str:
    """The configured model, or for ``model=registry`` the role's active version (polled, not queried every step).

    Registry versions are weight folders, so only a local backend serves them; a remote or scripted role asks for
    its base model, and an inference server rolls out new weights itself (vLLM's LoRA adapters, a new endpoint).
    """
    global _checked_at
    configured = settings.role(role.value)
    if configured.model != REGISTRY:
        return configured.model
    if configured.backend != "local":
        return configured.base_model
    if _serving is not None and time.monotonic() - _checked_at < settings.registry_poll_s:
        return _serving
    _checked_at = time.monotonic()
    try:
        return _active_version_path(settings, role) or configured.base_model
    except sqlalchemy.exc.SQLAlchemyError as exc:
        if _serving is None:
            raise
        # A store outage must not fail the steps this worker can serve: keep the model it has until the registry answers.
        log.warning("worker.registry_unreachable", serving=_serving, error=type(exc).__name__)
        return _serving


def backend() -> Backend:
    """The process's loaded model; a newly promoted registry version replaces it between two batches, never during one.

    Only the batcher thread calls it once the worker runs (and the worker's start before that), so a swap never races.
    """
    global _backend, _serving
    if _role is None:
        raise RuntimeError("this process serves no role; start it with `umiq worker planner|caller|summarizer`")
    settings = get_settings()
    wanted = _wanted_model(settings, _role)
    if _backend is None or wanted != _serving:
        started = time.perf_counter()
        role_settings = settings.role(_role.value).model_copy(update={"model": wanted})
        replaced = _backend
        previous = replaced.model_version if replaced is not None else None
        _backend, _serving = load_backend(role_settings, settings), wanted
        close = getattr(replaced, "close", None)
        if close is not None:  # a remote backend holds a thread pool and an HTTP session
            close()
        log.info(
            "worker.model_ready",
            role=_role.value,
            model_version=_backend.model_version,
            replaced=previous,
            seconds=round(time.perf_counter() - started, 2),
        )
    return _backend


def batcher() -> Batcher:
    """The process's one batcher, shared by every task thread; it asks :func:`backend` for the model before each batch."""
    global _batcher
    if _role is None:
        raise RuntimeError("this process serves no role; start it with `umiq worker planner|caller|summarizer`")
    with _batcher_lock:
        if _batcher is None:
            role_settings = get_settings().role(_role.value)
            _batcher = Batcher(
                backend,
                max_size=role_settings.batch_size,
                window_s=role_settings.batch_window_ms / 1000,
                name=f"{_role.value}-batcher",
            )
        return _batcher


@worker_init.connect
@worker_process_init.connect
def _load_on_start(**_: Any) -> None:
    if _role is not None:
        backend()
        batcher()


def _generate(role: ModelRole, step_id: int, trajectory_id: str, turn: int, seq: int, prompt: Prompt, stop: list[str], **_: Any) -> None:
    with bind_step(trajectory_id, turn, seq, role.value):
        settings = get_settings()
        role_settings = settings.role(role.value)
        request = GenerationRequest(
            prompt=prompt,
            max_new_tokens=role_settings.max_new_tokens,
            temperature=role_settings.temperature,
            stop=[*stop, *role_settings.stop],
        )
        started = time.perf_counter()
        batched = batcher().submit(request).result(timeout=settings.step_timeout_s)
        result = batched.result
        latency_ms = (time.perf_counter() - started) * 1000
        payload = {
            "text": result.text,
            "tokens_in": result.tokens_in,
            "tokens_out": result.tokens_out,
            "latency_ms": latency_ms,
            "model_version": batched.model_version,
            "batch_size": batched.batch_size,
            "worker": f"{role.value}@{socket.gethostname()}",
            "error": result.error,
        }
        send(STEP_RESULT, {"step_id": step_id, "result": payload})
        # Logged once the result is on its way: the orchestrator need not wait for the line to be rendered.
        log.info(
            "step.generated",
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
            latency_ms=round(latency_ms, 1),
            batch_size=batched.batch_size,
            error=result.error,
        )


def _register(role: ModelRole) -> None:
    def generate(**kwargs: Any) -> None:
        _generate(role, **kwargs)

    generate.__doc__ = f"Generate one {role.value} step and send the text back to the orchestrator."
    app.task(name=generate_task_name(role.value), acks_late=True)(generate)


for _r in ModelRole:
    _register(_r)
