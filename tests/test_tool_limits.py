"""The tools pool's limits through real workers: a call that allocates too much or hangs becomes an error observation.

All five pools run (tests/pools.py) with the scripted role backends, a 256 MB memory allowance per tool call and a
2 s tool timeout; the tools worker imports tests/limit_tools.py, whose tools break those limits on purpose.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from orchestrator.client import Client
from orchestrator.schemas import TaskSpec
from orchestrator.settings import Settings
from orchestrator.store import ToolCall
from tests.limit_tools import TOOLSET
from tests.pools import running_pools, scripted_roles

__all__: list[str] = []

LIMITS = {"UMIQ_TOOL_MODULES": json.dumps(["tests.limit_tools"]), "UMIQ_TOOL_MEMORY_MB": "256", "UMIQ_TOOL_TIMEOUT_S": "2"}


def call(tool: str, **arguments: object) -> str:
    """A user turn that makes the scripted caller (tests/scripted_roles.py) call ``tool``."""
    return f"Run {tool}. CALL " + json.dumps({"tool": tool, "arguments": arguments})


@pytest.fixture(scope="module")
def pools(settings: Settings, engine: sa.Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log_dir = tmp_path_factory.mktemp("limit_pool_logs")
    with running_pools(settings, log_dir, {**scripted_roles(), **LIMITS}):
        yield log_dir


def test_a_tool_over_its_memory_or_time_limit_becomes_an_error_observation(
    settings: Settings, engine: sa.Engine, pools: Path
) -> None:
    client = Client(settings)
    turns = [call("hog", mb=4096), call("hog", mb=32), call("hang", seconds=60), call("ping")]
    task_id = client.submit(TaskSpec(turns=turns, tools=[TOOLSET]))
    view = client.wait(task_id, timeout=120)
    assert view.status == "completed", view.failure
    assert [o["outcome"] for o in view.outcomes] == ["concluded"] * 4

    with Session(engine) as session:
        calls = session.exec(select(ToolCall).where(ToolCall.trajectory_id == view.trajectory_id).order_by(ToolCall.id)).all()
    assert [(c.turn, c.tool) for c in calls] == [(0, "hog"), (1, "hog"), (2, "hang"), (3, "ping")]
    too_big, fits, hung, after = calls
    assert too_big.error == "tool 'hog' ran out of memory (limit 256 MB)"
    assert json.loads(too_big.observation) == {"error": too_big.error}
    assert (fits.error, fits.observation) == (None, "32")  # the process that hit the limit serves on
    assert hung.error == "tool 'hang' timed out after 2 s"
    assert json.loads(hung.observation) == {"error": hung.error}
    assert (after.error, after.observation) == (None, '"pong"')
    detail = client.get(task_id, detail=True)
    observations = [m.content for m in detail.messages if m.speaker == "observation"]
    assert "ran out of memory" in observations[0] and "timed out" in observations[2]

    limited = [json.loads(line) for line in (pools / "tools.log").read_text().splitlines() if "tools.memory_limited" in line]
    assert len(limited) >= 2 and all(event["tool_memory_mb"] == 256 for event in limited)  # each pool process
