"""Logs: one JSON event per line in production, step context on every event, secrets never written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from orchestrator.logs import bind_step, setup_logging
from orchestrator.settings import Settings


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    setup_logging(Settings(log_format="json", log_level="INFO"), stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _events(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_every_event_of_a_step_carries_its_context(json_logs: io.StringIO) -> None:
    with bind_step("traj1", 2, 7, "planner"):
        structlog.get_logger("umiq.test").info("step.generated", tokens_out=12)
        logging.getLogger("celery.test").warning("library message inside a step")
    structlog.get_logger("umiq.test").info("outside")
    inside, library, outside = _events(json_logs)
    for event in (inside, library):
        assert {k: event[k] for k in ("trajectory_id", "turn", "step", "role")} == {
            "trajectory_id": "traj1",
            "turn": 2,
            "step": 7,
            "role": "planner",
        }
    assert inside["event"] == "step.generated" and inside["tokens_out"] == 12 and inside["level"] == "info"
    assert "trajectory_id" not in outside


def test_secrets_are_redacted(json_logs: io.StringIO) -> None:
    structlog.get_logger("umiq.test").info("key.used", api_key="sk-secret", authorization="Bearer x")
    (event,) = _events(json_logs)
    assert event["api_key"] == "***" and event["authorization"] == "***"
