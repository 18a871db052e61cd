"""Executable evaluation on BFCL: entries of a split run end to end through the serving path, judged by BFCL's checker.

Static evaluation (:mod:`training.evaluate`) scores each step from the gold history; this scores what the deployed
system does on its own: every entry of a multi-turn category in a split (:mod:`training.split`, test by default on
the CLI) is submitted as a task with all its turns (or its first ``turns``, for a CPU-sized run) through a :class:`orchestrator.client.Client`, so through the
orchestrator and the role pools exactly as production traffic, and its trajectory is judged by BFCL's multi-turn
checker (:func:`orchestrator.bfcl_tasks.judge`, which stores the verdict with the trajectory). Entries are
submitted all at once, so batching pools batch them; each may take ``timeout_s`` from its submission, and one that
is still running then counts as failed with the error type ``timeout`` (the run never hangs on it).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from orchestrator.bfcl_tasks import bfcl_task, category_of, judge
from orchestrator.client import Client, TaskTimeout
from orchestrator.schemas import TaskView
from orchestrator.settings import Settings
from orchestrator.showing import served_versions
from orchestrator.store import get_engine
from training.split import load_split, scenario
from workers.tools.bfcl import MULTI_TURN_CATEGORIES

__all__ = ["TIMEOUT", "BfclEvaluation", "EntryResult", "evaluate_bfcl", "select_ids"]

log = structlog.get_logger(__name__)

TIMEOUT = "timeout"
"""The error type of an entry still running when its time was up."""


@dataclass(frozen=True)
class EntryResult:
    """One entry's run: where its trajectory is stored, BFCL's verdict on it, and what it cost."""

    bfcl_id: str
    task_id: str
    trajectory_id: str
    valid: bool
    error_type: str | None
    status: str
    steps: int
    seconds: float


@dataclass(frozen=True)
class BfclEvaluation:
    """The verdicts on every entry of one category and split, and the models that served them (role -> versions).

    ``turns`` is set when each entry was cut to its first turns: such a run is not comparable with a full one.
    """

    category: str
    split: str
    turns: int | None
    results: list[EntryResult]
    models: dict[str, str]
    seconds: float

    @property
    def passed(self) -> int:
        """Entries BFCL's checker judged valid."""
        return sum(r.valid for r in self.results)

    @property
    def accuracy(self) -> float:
        """Percent of entries judged valid: BFCL's multi-turn accuracy on these entries."""
        return 100.0 * self.passed / len(self.results) if self.results else 0.0

    @property
    def error_types(self) -> Counter[str]:
        return Counter(r.error_type for r in self.results if not r.valid and r.error_type)

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "split": self.split,
            "turns": self.turns,
            "entries": len(self.results),
            "accuracy": self.accuracy,
            "error_types": dict(self.error_types.most_common()),
            "models": self.models,
            "seconds": self.seconds,
            "results": [asdict(r) for r in self.results],
        }

    def to_markdown(self) -> str:
        """A summary line, the error types and one row per entry, for a report or a pull request."""
        cut = f", first {self.turns} turn(s) of each entry" if self.turns else ""
        head = f"BFCL `{self.category}`, split `{self.split}`{cut}: **{self.accuracy:.1f}%** valid ({self.passed} of {len(self.results)})"
        lines = [
            f"{head} in {self.seconds:.0f} s",
            "",
            "| role | model |",
            "|---|---|",
            *(f"| {role} | {models} |" for role, models in sorted(self.models.items())),
        ]
        if self.error_types:
            lines += ["", "| error type | entries |", "|---|---|"]
            lines += [f"| {error} | {count} |" for error, count in self.error_types.most_common()]
        lines += ["", "| entry | valid | error type | status | steps | seconds | trajectory |", "|---|---|---|---|---|---|---|"]
        lines += [
            f"| {r.bfcl_id} | {'yes' if r.valid else 'no'} | {r.error_type or '-'} | {r.status} | {r.steps} "
            f"| {r.seconds:.1f} | {r.trajectory_id} |"
            for r in self.results
        ]
        return "\n".join(lines) + "\n"


def select_ids(category: str, split: str, *, ids: Sequence[str] | None = None, limit: int | None = None) -> list[str]:
    """The entries to run: the category's ids in the split by scenario number, or ``ids`` (checked), then ``limit``.

    An explicit id outside the category or the split is refused, so a run reported as the test split never holds
    an entry of another split.
    """
    if category not in MULTI_TURN_CATEGORIES:
        raise ValueError(f"unknown BFCL multi-turn category {category!r}; choose one of {', '.join(MULTI_TURN_CATEGORIES)}")
    in_split = sorted((i for i in load_split(split) if category_of(i) == category), key=scenario)
    if ids is not None:
        outside = [i for i in ids if i not in in_split]
        if outside:
            raise ValueError(f"not {category} entries of the {split} split: {', '.join(outside)}")
        in_split = list(ids)
    return in_split[:limit]


def _result(client: Client, bfcl_id: str, task_id: str, submitted: float, timeout_s: float) -> tuple[EntryResult, TaskView]:
    """Wait for one entry until its own deadline, then judge it (a timed-out one is failed, not judged)."""
    try:
        waited = client.wait(task_id, timeout=max(0.0, submitted + timeout_s - time.monotonic()))
    except TaskTimeout as exc:
        waited = exc.last
    with structlog.contextvars.bound_contextvars(trajectory_id=waited.trajectory_id, bfcl_id=bfcl_id):
        if waited.status == "running":
            log.warning("bfcl.timeout", timeout_s=timeout_s)
            verdict: dict[str, Any] = {"valid": False, "error_type": TIMEOUT}
        else:
            verdict = judge(get_engine(client.settings.resolved_database_url), task_id)
        view = client.get(task_id, detail=True)
        ran = view.finished_at - view.created_at if view.finished_at else None
        result = EntryResult(
            bfcl_id=bfcl_id,
            task_id=task_id,
            trajectory_id=view.trajectory_id,
            valid=verdict["valid"],
            error_type=verdict["error_type"],
            status=waited.status,
            steps=len(view.steps),
            seconds=ran.total_seconds() if ran is not None else time.monotonic() - submitted,
        )
        log.info("bfcl.judged", valid=result.valid, error_type=result.error_type, status=result.status, steps=result.steps)
    return result, view


def evaluate_bfcl(
    settings: Settings,
    client: Client,
    *,
    category: str,
    split: str,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    turns: int | None = None,
    steps_per_turn: int | None = None,
    timeout_s: float,
) -> BfclEvaluation:
    """Run the chosen entries through the running pools behind ``client`` and judge each one.

    ``turns`` cuts each entry to its first turns (the checker then judges those only). ``steps_per_turn`` is the
    planner-step budget of every turn (default ``UMIQ_MAX_STEPS_PER_TURN``); the trajectory's budget covers all its
    turns at that rate. ``timeout_s`` bounds each entry from its submission.
    """
    chosen = select_ids(category, split, ids=ids, limit=limit)
    per_turn = steps_per_turn or settings.max_steps_per_turn
    specs = [bfcl_task(bfcl_id, n_turns=turns, steps_per_turn=per_turn) for bfcl_id in chosen]
    started = time.monotonic()
    submitted = [(bfcl_id, client.submit(spec), time.monotonic()) for bfcl_id, spec in zip(chosen, specs, strict=True)]
    log.info("bfcl.submitted", category=category, split=split, entries=len(submitted), steps_per_turn=per_turn)
    judged = [_result(client, bfcl_id, task_id, at, timeout_s) for bfcl_id, task_id, at in submitted]
    evaluation = BfclEvaluation(
        category=category,
        split=split,
        turns=turns,
        results=[result for result, _ in judged],
        models=served_versions([view for _, view in judged]),
        seconds=time.monotonic() - started,
    )
    log.info("bfcl.evaluated", category=category, split=split, entries=len(chosen), accuracy=evaluation.accuracy)
    return evaluation
