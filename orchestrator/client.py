"""The Python client of umiq: how a backend service enqueues agent tasks and follows them, in process or over HTTP.

:class:`Client` talks to the store and the broker directly (no API server in between); :class:`HttpClient` offers
the same methods over the HTTP API for services in other processes. Both validate with the same pydantic models
and return the same views, and both follow a task by polling the store, which is the source of truth.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

from orchestrator import queues, store, views
from orchestrator import engine as engine_ops
from orchestrator.engine import NotFound, UnknownToolSet
from orchestrator.schemas import FeedbackSpec, StepView, TaskSpec, TaskView, TurnSpec
from orchestrator.settings import Settings, get_settings

__all__ = ["Client", "HttpClient", "TaskTimeout", "RequestRejected"]

POLL_INTERVAL_S = 0.2


class TaskTimeout(TimeoutError):
    """A task was still running when the caller stopped waiting; ``last`` is the last status read."""

    def __init__(self, last: TaskView, timeout: float) -> None:
        super().__init__(f"task {last.id} still {last.status} after {timeout:g} s (turn {last.turn})")
        self.last = last


class RequestRejected(ValueError):
    """The HTTP API refused a request as invalid (422) or too large (413); ``detail`` is its explanation."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


def _spec(task: TaskSpec | dict[str, Any]) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else TaskSpec.model_validate(task)


class _Follower:
    """``wait`` and ``stream`` built on ``get`` and ``_steps_since``, so the two clients follow a task identically."""

    poll_interval_s: float = POLL_INTERVAL_S

    def get(self, task_id: str) -> TaskView:
        raise NotImplementedError

    def _steps_since(self, view: TaskView, after_seq: int) -> list[StepView]:
        raise NotImplementedError

    def _pause(self, deadline: float, view: TaskView, timeout: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TaskTimeout(view, timeout)
        time.sleep(min(self.poll_interval_s, left))

    def wait(self, task_id: str, timeout: float) -> TaskView:
        """Block until the trajectory leaves 'running'; raises :class:`TaskTimeout` (a ``TimeoutError``) if not."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.get(task_id)
            if views.is_finished(view):
                return view
            self._pause(deadline, view, timeout)

    def stream(self, task_id: str, timeout: float) -> Iterator[StepView]:
        """Yield each finished step once, in order, until the trajectory finishes or ``timeout`` passes.

        The status is read before the steps: a trajectory finishes in the transaction that stores its last step,
        so once a finished status is seen, the steps read after it are complete.
        """
        deadline = time.monotonic() + timeout
        after_seq = -1
        while True:
            view = self.get(task_id)
            for step in self._steps_since(view, after_seq):
                after_seq = step.seq
                yield step
            if views.is_finished(view):
                return
            self._pause(deadline, view, timeout)


class Client(_Follower):
    """In-process access for services that share the store and broker; the store must already be migrated."""

    def __init__(self, settings: Settings | None = None, *, owner: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.owner = owner
        queues.configure(self.settings)  # the engine publishes through the process-wide Celery app
        self._db = store.get_engine(self.settings.resolved_database_url)

    def submit(self, task: TaskSpec | dict[str, Any]) -> str:
        """Store and enqueue a task; returns its id. Invalid tasks raise pydantic's ``ValidationError``."""
        return engine_ops.submit(self._db, _spec(task), self.settings, owner=self.owner).id

    def append_turn(self, task_id: str, text: str) -> int:
        """Continue a task with another user turn; returns how many turns it now carries."""
        return len(engine_ops.append_turn(self._db, task_id, TurnSpec(text=text).text, self.settings, owner=self.owner).turns)

    def feedback(self, task_id: str, score: float, comment: str | None = None) -> int:
        """Score the task's trajectory for the learning loop; returns the feedback id."""
        spec = FeedbackSpec(score=score, comment=comment)
        return engine_ops.add_feedback(self._db, task_id, spec.score, spec.comment, owner=self.owner)

    def get(self, task_id: str, *, detail: bool = False) -> TaskView:
        with store.session_scope(self._db) as session:
            return views.task_view(session, task_id, owner=self.owner, detail=detail)

    def _steps_since(self, view: TaskView, after_seq: int) -> list[StepView]:
        with store.session_scope(self._db) as session:
            return views.steps_since(session, view.trajectory_id, after_seq)


class HttpClient(_Follower):
    """The same methods over the HTTP API; pass ``http`` to reuse a configured ``httpx.Client`` (or a TestClient)."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0, http: httpx.Client | None = None) -> None:
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout_s)
        self._owns_http = http is None

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def submit(self, task: TaskSpec | dict[str, Any]) -> str:
        """Validated here first, with the server's own model, so a bad task fails the same way as in process."""
        body = _spec(task).model_dump(mode="json")
        return self._call("POST", "/v1/tasks", json=body)["id"]

    def append_turn(self, task_id: str, text: str) -> int:
        turn = TurnSpec(text=text)
        return self._call("POST", f"/v1/tasks/{task_id}/turns", task_id, json=turn.model_dump())["turns"]

    def feedback(self, task_id: str, score: float, comment: str | None = None) -> int:
        body = FeedbackSpec(score=score, comment=comment).model_dump()
        return self._call("POST", f"/v1/tasks/{task_id}/feedback", task_id, json=body)["id"]

    def get(self, task_id: str, *, detail: bool = False) -> TaskView:
        path = f"/v1/tasks/{task_id}/trajectory" if detail else f"/v1/tasks/{task_id}"
        return TaskView.model_validate(self._call("GET", path, task_id))

    def _steps_since(self, view: TaskView, after_seq: int) -> list[StepView]:
        rows = self._call("GET", f"/v1/tasks/{view.id}/steps", view.id, params={"after_seq": after_seq})
        return [StepView.model_validate(row) for row in rows]

    def _call(self, method: str, path: str, task_id: str | None = None, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.is_success:
            return response.json()
        detail = _detail(response)
        if response.status_code == 404:
            raise NotFound(task_id or detail)
        if response.status_code == 400 and path == "/v1/tasks":
            raise UnknownToolSet(detail)
        if response.status_code in (413, 422):
            raise RequestRejected(response.status_code, detail)
        response.raise_for_status()


def _detail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text
    return body.get("detail", body) if isinstance(body, dict) else body
