"""``umiq eval bfcl``'s path: BFCL entries through the real pools (Celery workers on Redis and Postgres), judged by
BFCL's own checker; and tools withheld until a later turn (BFCL's miss-function category) at the engine.

The role pools replay the ground truth (tests/replay_roles.py), so the system is perfect by construction: it must
score 100%, and with one ground-truth call left out the checker must fail that entry with its error type.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from pydantic import ValidationError
from sqlmodel import Session, select

from orchestrator import engine as engine_ops
from orchestrator.bfcl_tasks import bfcl_task, entry
from orchestrator.client import Client
from orchestrator.schemas import TaskOptions, TaskSpec
from orchestrator.settings import Settings
from orchestrator.store import Message, ToolCall, Trajectory
from tests.celery_messages import decode
from tests.pools import running_pools, scripted_roles
from tests.replay_roles import SKIP_ENV
from training.bfcl_eval import TIMEOUT, evaluate_bfcl, select_ids
from workers.tools import bfcl

ENTRIES = ["multi_turn_base_30", "multi_turn_base_78", "multi_turn_base_176"]
"""Test-split entries of two turns and three ground-truth calls each: the cheapest to replay."""

BASE = {"category": "multi_turn_base", "split": "test"}

# ------------------------------------------------------------------------------------------- withheld tools, engine


def _take(broker: redis.Redis, queue: str) -> dict[str, Any]:
    """The one message waiting on ``queue``, removed from it, as the kwargs its worker would get."""
    assert broker.llen(queue) == 1, f"expected one message on {queue}"
    _headers, kwargs = decode(broker.rpop(queue))
    return kwargs


def _shown(kwargs: dict[str, Any]) -> str:
    """The tool documentation of a chat-mode planner or caller prompt (its system message)."""
    return kwargs["prompt"][0]["content"]


def test_a_withheld_tool_is_hidden_and_unknown_until_its_turn(
    settings: Settings, engine: sa.Engine, catalog: str, redis_queues: redis.Redis
) -> None:
    spec = TaskSpec(turns=["Echo hi.", "Now echo hi."], tools=[catalog], options=TaskOptions(tools_withheld_until={"echo": 1}))
    task = engine_ops.submit(engine, spec, settings)
    planner = _take(redis_queues, "planner")
    assert '"name": "add"' in _shown(planner) and '"name": "echo"' not in _shown(planner)
    engine_ops.handle_result(engine, planner["step_id"], {"text": "I echo.\n Next: caller."}, settings)
    caller = _take(redis_queues, "caller")
    assert '"name": "echo"' not in _shown(caller)
    engine_ops.handle_result(engine, caller["step_id"], {"text": 'Action: echo\nAction Input: {"text": "hi"}'}, settings)
    assert redis_queues.llen("tools") == 0  # nothing ran: the call is answered like a call to no tool at all
    with Session(engine) as session:
        trajectory_id = session.exec(select(Trajectory.id).where(Trajectory.task_id == task.id)).one()
        observation = session.exec(select(Message).where(Message.trajectory_id == trajectory_id, Message.speaker == "observation")).one()
        assert "no tool named 'echo' exists" in observation.content
        assert session.exec(select(ToolCall.hallucinated).where(ToolCall.trajectory_id == trajectory_id)).all() == [True]

    engine_ops.handle_result(engine, _take(redis_queues, "planner")["step_id"], {"text": "Done.\n Next: conclusion."}, settings)
    engine_ops.handle_result(engine, _take(redis_queues, "summarizer")["step_id"], {"text": "I cannot echo."}, settings)
    planner = _take(redis_queues, "planner")  # turn 1: echo is revealed
    assert '"name": "echo"' in _shown(planner)
    engine_ops.handle_result(engine, planner["step_id"], {"text": "I echo.\n Next: caller."}, settings)
    caller = _take(redis_queues, "caller")
    assert '"name": "echo"' in _shown(caller)
    engine_ops.handle_result(engine, caller["step_id"], {"text": 'Action: echo\nAction Input: {"text": "hi"}'}, settings)
    assert _take(redis_queues, "tools")["tool"] == "echo"


@pytest.mark.usefixtures("redis_queues")
def test_withheld_tools_are_validated(settings: Settings, engine: sa.Engine, catalog: str) -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        TaskOptions(tools_withheld_until={"echo": 0})
    spec = TaskSpec(turns=["Hi."], tools=[catalog], options=TaskOptions(tools_withheld_until={"sort": 1}))
    with pytest.raises(engine_ops.UnknownTool, match="sort"):
        engine_ops.submit(engine, spec, settings)


def test_bfcl_tasks_withhold_the_miss_function_tools() -> None:
    assert bfcl_task("multi_turn_miss_func_0").options.tools_withheld_until == {"sort": 3}
    assert bfcl_task("multi_turn_base_0").options.tools_withheld_until == {}


def test_ids_must_be_of_the_category_and_split() -> None:
    assert len(select_ids(**BASE)) == 30 and select_ids(**BASE, limit=2) == ["multi_turn_base_9", "multi_turn_base_19"]
    with pytest.raises(ValueError, match="multi_turn_base_0"):
        select_ids(**BASE, ids=["multi_turn_base_0"])  # a train entry
    with pytest.raises(ValueError, match="unknown BFCL multi-turn category"):
        select_ids("multi_turn_nothing", "test")


# ---------------------------------------------------------------------------------- end to end through the pools


@pytest.fixture(scope="module")
def skip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replay") / "skip.json"
    path.write_text("[]")
    return path


@pytest.fixture(scope="module")
def client(settings: Settings, engine: sa.Engine, skip_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    env = {**scripted_roles("tests.replay_roles"), SKIP_ENV: str(skip_file)}
    with running_pools(settings, tmp_path_factory.mktemp("pool_logs"), env):
        yield Client(settings)


def _verdict(engine: sa.Engine, trajectory_id: str) -> dict[str, Any] | None:
    with Session(engine) as session:
        return session.get(Trajectory, trajectory_id).verdict


def test_replayed_ground_truth_scores_100(settings: Settings, engine: sa.Engine, client: Client) -> None:
    evaluation = evaluate_bfcl(settings, client, **BASE, ids=ENTRIES, timeout_s=120)
    assert evaluation.accuracy == 100.0, evaluation.to_markdown()
    assert [r.bfcl_id for r in evaluation.results] == ENTRIES
    for result in evaluation.results:
        assert (result.status, result.valid, result.error_type) == ("completed", True, None)
        assert result.steps == 3 * 3 + 2 * 2 and result.seconds > 0  # per call planner, caller, tool; per turn planner, summarizer
        assert _verdict(engine, result.trajectory_id) == {"valid": True, "error_type": None}
    report = json.loads(json.dumps(evaluation.to_dict()))
    assert (report["entries"], report["accuracy"], report["error_types"]) == (3, 100.0, {})
    assert report["models"]["planner"] == "scripted:tests.replay_roles:planner"


def test_one_call_left_out_scores_less(settings: Settings, engine: sa.Engine, client: Client, skip_file: Path) -> None:
    skip_file.write_text(json.dumps([["multi_turn_base_30", 0, 0]]))  # cd(folder='project') before cat of a file in it
    try:
        evaluation = evaluate_bfcl(settings, client, **BASE, ids=ENTRIES, timeout_s=120)
    finally:
        skip_file.write_text("[]")
    assert evaluation.accuracy == pytest.approx(200 / 3)
    [failed] = [r for r in evaluation.results if not r.valid]
    assert failed.bfcl_id == "multi_turn_base_30" and failed.status == "completed"
    first, second = bfcl.ground_truth_calls(entry("multi_turn_base_30"))
    expected = bfcl.check_entry(entry("multi_turn_base_30"), [first[1:], second])["error_type"]  # the checker, offline
    assert failed.error_type == expected and expected.startswith("multi_turn:")
    assert evaluation.error_types == {expected: 1}
    assert _verdict(engine, failed.trajectory_id) == {"valid": False, "error_type": failed.error_type}
    assert f"| multi_turn_base_30 | no | {failed.error_type} |" in evaluation.to_markdown()


def test_an_entry_cut_to_its_first_turn_is_judged_on_it(settings: Settings, client: Client) -> None:
    evaluation = evaluate_bfcl(settings, client, **BASE, ids=ENTRIES[:1], turns=1, timeout_s=120)
    [result] = evaluation.results
    assert (result.valid, result.steps) == (True, 2 * 3 + 2)  # the first turn's two calls, then conclusion and summary
    assert evaluation.to_dict()["turns"] == 1 and "first 1 turn(s) of each entry" in evaluation.to_markdown()


def test_an_entry_out_of_time_fails_as_timeout(settings: Settings, client: Client) -> None:
    [result] = evaluate_bfcl(settings, client, **BASE, ids=ENTRIES[:1], timeout_s=0).results
    assert (result.valid, result.error_type, result.status) == (False, TIMEOUT, "running")
