"""Whole trajectories through real pools: Celery workers started here, on real Redis and Postgres.

The three role pools answer from tests/scripted_roles.py (through the scripted backend) so every step is
predictable; the tools pool runs BFCL's real file-system environment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import Session, func, select

from orchestrator.client import Client
from orchestrator.schemas import TaskSpec
from orchestrator.settings import Settings
from orchestrator.store import Message, Step, ToolCall
from tests.pools import running_pools, scripted_roles

FS = "GorillaFileSystem"
FS_CONFIG = {FS: {"root": {"alex": {"type": "directory", "contents": {"notes.txt": {"type": "file", "content": "hi"}}}}}}


def call(tool: str, **arguments: object) -> str:
    return "CALL " + json.dumps({"tool": tool, "arguments": arguments})


@pytest.fixture(scope="module")
def pools(settings: Settings, engine: sa.Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log_dir = tmp_path_factory.mktemp("pool_logs")
    with running_pools(settings, log_dir, scripted_roles()):
        yield log_dir


@pytest.fixture
def client(settings: Settings, pools: Path) -> Client:
    return Client(settings)


def _spec(*turns: str) -> TaskSpec:
    return TaskSpec(turns=list(turns), tools=[FS], initial_config=FS_CONFIG)


def test_multi_turn_trajectory_keeps_tool_state_and_stores_every_step(client: Client, engine: sa.Engine) -> None:
    task_id = client.submit(_spec(f"Make a reports folder. {call('mkdir', dir_name='reports')}", f"What is here? {call('ls')}"))
    view = client.wait(task_id, timeout=60)
    assert view.status == "completed", view.failure
    assert [o["outcome"] for o in view.outcomes] == ["concluded", "concluded"]
    detail = client.get(task_id, detail=True)
    speakers = [m.speaker for m in detail.messages]
    one_turn = ["user", "assistant", "caller", "observation", "assistant", "conclusion"]
    assert speakers == one_turn * 2
    assert [m.turn for m in detail.messages] == [0] * 6 + [1] * 6
    # the second turn sees the folder the first turn made: same trajectory, same tool state
    listing = json.loads(detail.messages[9].content)
    assert sorted(listing["current_directory_content"]) == ["notes.txt", "reports"]
    assert [s.kind for s in detail.steps] == ["planner", "caller", "tools", "planner", "summarizer"] * 2
    for step in detail.steps:
        assert step.status == "done" and step.latency_ms is not None and step.worker
        if step.kind != "tools":
            assert step.model_version.startswith("scripted:") and step.tokens_in > 0
    with Session(engine) as session:
        trajectory_id = detail.trajectory_id
        keys = session.exec(select(Step.idempotency_key).where(Step.trajectory_id == trajectory_id)).all()
        assert len(keys) == len(set(keys)) == 10
        calls = session.exec(select(ToolCall).where(ToolCall.trajectory_id == trajectory_id).order_by(ToolCall.id)).all()
        assert [(c.turn, c.tool, c.arguments) for c in calls] == [(0, "mkdir", {"dir_name": "reports"}), (1, "ls", {})]
        assert all(c.observation is not None and not c.hallucinated for c in calls)


def test_stream_yields_each_step_once_in_order(client: Client) -> None:
    task_id = client.submit(_spec(f"Where am I? {call('pwd')}"))
    seqs = [step.seq for step in client.stream(task_id, timeout=60)]
    assert seqs == [0, 1, 2, 3, 4]


def test_hallucinated_tool_runs_nothing_and_give_up_ends_the_turn(client: Client, engine: sa.Engine) -> None:
    task_id = client.submit(_spec(f"Do magic. {call('teleport', to='mars')}", "This one is impossible: GIVEUP"))
    view = client.wait(task_id, timeout=60)
    assert view.status == "failed"
    assert view.failure == "turns not concluded: 1"
    assert [o["outcome"] for o in view.outcomes] == ["concluded", "gave_up"]
    detail = client.get(task_id, detail=True)
    assert "tools" not in [s.kind for s in detail.steps]
    observation = next(m for m in detail.messages if m.speaker == "observation")
    assert "no tool named 'teleport'" in observation.content
    with Session(engine) as session:
        (hallucinated,) = session.exec(select(ToolCall).where(ToolCall.trajectory_id == detail.trajectory_id)).all()
        assert hallucinated.hallucinated and hallucinated.tool_step_id is None


def test_a_step_that_keeps_failing_is_dead_lettered_with_its_reason(client: Client) -> None:
    task_id = client.submit(_spec("FAIL always"))
    view = client.wait(task_id, timeout=60)
    assert view.status == "failed"
    assert "dead after 3 attempts" in view.failure and "scripted model failure" in view.failure
    dead = [s for s in client.get(task_id, detail=True).steps if s.status == "dead"]
    assert [(s.kind, s.attempt) for s in dead] == [("caller", 2)]


def test_a_new_turn_continues_a_finished_trajectory(client: Client, engine: sa.Engine) -> None:
    task_id = client.submit(_spec(f"Make a folder. {call('mkdir', dir_name='later')}"))
    first = client.wait(task_id, timeout=60)
    assert first.status == "completed"
    client.append_turn(task_id, f"And now? {call('ls')}")
    view = client.wait(task_id, timeout=60)
    assert view.status == "completed" and view.trajectory_id == first.trajectory_id
    assert "later" in view.outcomes[-1]["answer"]
    with Session(engine) as session:
        count = session.exec(select(func.count()).select_from(Message).where(Message.trajectory_id == view.trajectory_id)).one()
    assert count == 12
