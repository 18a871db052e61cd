"""Dynamic batching for a role worker: steps of different trajectories that arrive together run in one generate call.

Driven by ``UMIQ_<ROLE>__BATCH_SIZE`` and ``UMIQ_<ROLE>__BATCH_WINDOW_MS``. The role pool runs Celery's threads pool
with one task thread per batch slot; each task thread submits its step's request here and waits on a future. One
batcher thread per process takes the first waiting request, lets up to ``window_s`` pass for others to join (fewer
if the batch fills first), asks ``backend_source`` for the model, and calls ``generate`` once for all of them.

The model is looked up once per batch, in the batcher thread, so a registry hot-swap happens between two batches
and never during one. A failure stays with the request that caused it: if ``generate`` raises for a whole batch,
each request is retried alone, and one that still raises gets an error result (the orchestrator then retries or
dead-letters that step, as for any pool error). Futures always resolve with a :class:`Batched`, never an exception.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import structlog

from workers.backends.base import Backend, GenerationRequest, GenerationResult

__all__ = ["Batched", "Batcher"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Batched:
    """One request's result, with the size of the generate call it ran in and the model version that served it."""

    result: GenerationResult
    batch_size: int
    model_version: str | None


@dataclass(frozen=True)
class _Pending:
    """A submitted request and the future its task thread waits on."""

    request: GenerationRequest
    future: Future[Batched]


_STOP = object()
"""Queued by :meth:`Batcher.close`: the batcher thread finishes the batch in hand, then fails what is left."""


class Batcher:
    """Collects concurrently submitted requests into batches of at most ``max_size`` for one backend thread."""

    def __init__(
        self, backend_source: Callable[[], Backend], *, max_size: int, window_s: float, name: str = "batcher"
    ) -> None:
        if max_size < 1 or window_s < 0:
            raise ValueError(f"max_size must be at least 1 and window_s not negative, got {max_size} and {window_s}")
        self._backend_source = backend_source
        self.max_size = max_size
        self.window_s = window_s
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Future[Batched]:
        """Queue one request; the future resolves when the batch it joined has been generated."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future[Batched] = Future()
        self._queue.put(_Pending(request, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Stop after the batch in hand; requests still waiting resolve with an error result."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._gather(first)
            self._run(batch)
            if stopping:
                break
        self._drain()

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The first request and whatever joins within the window; a zero window takes only what already waits."""
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, batch: list[_Pending]) -> None:
        """Resolve every future of the batch, whatever happens; the model is looked up here, between batches."""
        try:
            backend = self._backend_source()
        except Exception as exc:
            log.error("batch.no_backend", rows=len(batch), error=f"{type(exc).__name__}: {exc}")
            outcomes = [Batched(_failure(exc), len(batch), None)] * len(batch)
        else:
            outcomes = _generate(backend, [pending.request for pending in batch])
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.future.set_result(outcome)

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Pending):
                item.future.set_result(Batched(_failure(RuntimeError("the batcher closed")), 0, None))


def _generate(backend: Backend, requests: Sequence[GenerationRequest]) -> list[Batched]:
    """One call for the batch; if it raises (or miscounts), each request again alone, so only the culprit fails."""
    started = time.perf_counter()
    try:
        results = backend.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"the backend returned {len(results)} results for {len(requests)} requests")
    except Exception as exc:
        if len(requests) == 1:
            log.warning("batch.request_failed", error=f"{type(exc).__name__}: {exc}")
            return [Batched(_failure(exc), 1, backend.model_version)]
        log.warning("batch.failed", rows=len(requests), error=f"{type(exc).__name__}: {exc}")
        return [_generate(backend, [request])[0] for request in requests]
    log.debug("batch.generated", rows=len(requests), seconds=round(time.perf_counter() - started, 3))
    return [Batched(result, len(requests), backend.model_version) for result in results]


def _failure(exc: Exception) -> GenerationResult:
    return GenerationResult(text="", tokens_in=0, tokens_out=0, error=f"{type(exc).__name__}: {exc}")
