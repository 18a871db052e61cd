"""Dynamic batching: on the real tiny model each step gets exactly what it would get alone, failures stay per step,
and through real pools concurrent trajectories really share generate calls (their batch sizes are stored).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from orchestrator.cli import _celery_argv
from orchestrator.client import Client
from orchestrator.schemas import TaskSpec
from orchestrator.settings import Settings, get_settings
from orchestrator.store import Step
from tests.pools import running_pools, scripted_roles
from workers.backends.base import GenerationRequest, GenerationResult
from workers.backends.local import LocalBackend
from workers.backends.models import TINY_SMOLLM2
from workers.batching import Batched, Batcher

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
PROMPTS = ["Hello", "The weather in Paris is " * 12, CHAT, "x", "Once upon a time", "1, 2, 3,"]


@pytest.fixture(scope="module")
def tiny(model_cache: Path) -> LocalBackend:
    return LocalBackend(TINY_SMOLLM2, cache_dir=model_cache, device="cpu")


class Versioned:
    """A backend under another version name: stands for a newly promoted model in the hot-swap test."""

    def __init__(self, inner: LocalBackend, model_version: str) -> None:
        self._inner = inner
        self.model_version = model_version

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self._inner.generate(requests)


class FailsWholeBatches(Versioned):
    """Raises for any call that holds a ``BOOM`` prompt, as a backend without LocalBackend's own fallback would."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if any(request.prompt == "BOOM" for request in requests):
            raise RuntimeError("the device fell over")
        return super().generate(requests)


def submit_together(batcher: Batcher, requests: Sequence[GenerationRequest]) -> list[Batched]:
    """Submit from one thread per request, all released at once, as a role pool's task threads do."""
    futures: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def submit(index: int) -> None:
        start.wait()
        futures[index] = batcher.submit(requests[index])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [future.result(timeout=120) for future in futures]


@pytest.fixture
def batcher(tiny: LocalBackend) -> Iterator[Batcher]:
    batcher = Batcher(lambda: tiny, max_size=16, window_s=1.0)
    yield batcher
    batcher.close(timeout=30)


def alone(backend: LocalBackend, request: GenerationRequest) -> GenerationResult:
    [result] = backend.generate([request])
    return result


def test_concurrent_steps_share_one_call_and_each_gets_its_own_output(tiny: LocalBackend, batcher: Batcher) -> None:
    stops = [[], ["."], ["\n"], [], [" the", ","], ["zz"]]
    requests = [GenerationRequest(p, max_new_tokens=12, stop=s) for p, s in zip(PROMPTS, stops, strict=True)]
    outcomes = submit_together(batcher, requests)
    assert [o.batch_size for o in outcomes] == [len(requests)] * len(requests)
    assert [o.result for o in outcomes] == [alone(tiny, r) for r in requests]
    assert all(o.result.error is None and o.model_version == tiny.model_version for o in outcomes)


def test_each_step_keeps_its_own_token_limit(batcher: Batcher) -> None:
    limits = [3, 9, 1, 14]
    outcomes = submit_together(batcher, [GenerationRequest(p, max_new_tokens=n) for p, n in zip(PROMPTS, limits)])
    assert [o.result.tokens_out for o in outcomes] == limits
    assert {o.batch_size for o in outcomes} == {len(limits)}


def test_a_failing_step_does_not_fail_its_batch(tiny: LocalBackend, batcher: Batcher) -> None:
    good = [GenerationRequest(p, max_new_tokens=6) for p in PROMPTS[:3]]
    no_room = GenerationRequest("Hello", max_new_tokens=9000)
    bad_stop = GenerationRequest("Hello", max_new_tokens=6, stop=[3])  # type: ignore[list-item]
    outcomes = submit_together(batcher, [good[0], no_room, good[1], bad_stop, good[2]])
    assert [outcomes[i].result for i in (0, 2, 4)] == [alone(tiny, r) for r in good]
    assert outcomes[1].result.error.startswith("ValueError:") and outcomes[3].result.error.startswith("TypeError:")


def test_a_batch_the_backend_raises_on_is_retried_step_by_step(tiny: LocalBackend) -> None:
    batcher = Batcher(lambda: FailsWholeBatches(tiny, "fragile"), max_size=8, window_s=1.0)
    good = [GenerationRequest(p, max_new_tokens=5) for p in PROMPTS[:3]]
    outcomes = submit_together(batcher, [good[0], GenerationRequest("BOOM"), good[1], good[2]])
    batcher.close(timeout=30)
    assert outcomes[1].result == GenerationResult("", 0, 0, "RuntimeError: the device fell over")
    assert [outcomes[i].result for i in (0, 2, 3)] == [alone(tiny, r) for r in good]
    assert {o.batch_size for o in outcomes} == {1}


def test_the_model_is_swapped_between_batches_never_during_one(tiny: LocalBackend) -> None:
    served: list[str] = []

    def source() -> Versioned:
        served.append(f"v{len(served)}")
        return Versioned(tiny, served[-1])

    batcher = Batcher(source, max_size=4, window_s=1.0)
    outcomes = submit_together(batcher, [GenerationRequest(p, max_new_tokens=3) for p in PROMPTS[:4]])
    outcomes += submit_together(batcher, [GenerationRequest(p, max_new_tokens=3) for p in PROMPTS[2:5]])
    batcher.close(timeout=30)
    assert served == ["v0", "v1"]
    assert [(o.model_version, o.batch_size) for o in outcomes] == [("v0", 4)] * 4 + [("v1", 3)] * 3


def test_no_more_than_the_batch_size_runs_together(tiny: LocalBackend) -> None:
    batcher = Batcher(lambda: tiny, max_size=2, window_s=0.5)
    outcomes = submit_together(batcher, [GenerationRequest(p, max_new_tokens=2) for p in PROMPTS[:5]])
    batcher.close(timeout=30)
    assert sorted(o.batch_size for o in outcomes) == [1, 2, 2, 2, 2]


def test_role_pools_run_one_task_thread_per_batch_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMIQ_CALLER__BATCH_SIZE", "5")
    get_settings.cache_clear()
    try:
        argv = _celery_argv("caller", 2, "INFO")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert argv[argv.index("--pool") :][:4] == ["--pool", "threads", "--concurrency", "5"]


# ------------------------------------------------------------------------------------------------- through real pools


@pytest.fixture(scope="module")
def pools(settings: Settings, engine: sa.Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Scripted role pools with a long batch window, so trajectories submitted together are batched together."""
    log_dir = tmp_path_factory.mktemp("batching_pool_logs")
    windows = {f"UMIQ_{role}__BATCH_WINDOW_MS": "400" for role in ("PLANNER", "CALLER", "SUMMARIZER")}
    with running_pools(settings, log_dir, {**scripted_roles(), **windows}):
        yield log_dir


def test_concurrent_trajectories_complete_and_store_their_batch_sizes(
    settings: Settings, engine: sa.Engine, pools: Path
) -> None:
    client = Client(settings)
    calls = [{"tool": "add", "arguments": {"a": i, "b": 1}} for i in range(6)]
    ids = [client.submit(TaskSpec(turns=[f"Add. CALL {json.dumps(c)}"], tools=["calculator"])) for c in calls]
    views = [client.wait(task_id, timeout=120) for task_id in ids]
    assert [v.status for v in views] == ["completed"] * len(ids), [v.failure for v in views]
    assert [v.outcomes[0]["answer"] for v in views] == [f"Done. Last observation: {i + 1}" for i in range(len(ids))]
    with Session(engine) as session:
        steps = session.exec(select(Step).where(Step.trajectory_id.in_([v.trajectory_id for v in views]))).all()
    models = [s for s in steps if s.kind != "tools"]
    assert len(models) == 4 * len(ids)
    assert all(1 <= s.batch_size <= 8 for s in models)
    assert all(s.batch_size is None for s in steps if s.kind == "tools")
    assert max(s.batch_size for s in models if s.kind == "planner") > 1
