"""The embedded default: no servers, SQLite and kombu's filesystem broker, the same pools and the same code path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import queues
from orchestrator.client import Client
from orchestrator.schemas import TaskSpec
from orchestrator.settings import Settings, get_settings
from orchestrator.store import migrate
from tests.pools import running_pools, scripted_roles


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    for name in ("UMIQ_DATABASE_URL", "UMIQ_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(home=tmp_path / "home")
    assert settings.embedded and settings.resolved_database_url.startswith("sqlite:///")
    migrate(settings.resolved_database_url)
    yield settings
    queues.configure(get_settings())


def test_a_multi_turn_task_runs_on_sqlite_and_the_filesystem_broker(embedded: Settings, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    with running_pools(embedded, logs, scripted_roles()):
        client = Client(embedded)
        task_id = client.submit(
            TaskSpec(
                turns=['Add. CALL {"tool": "add", "arguments": {"a": 2, "b": 3}}', 'Again. CALL {"tool": "multiply", "arguments": {"a": 5, "b": 4}}'],
                tools=["calculator"],
            )
        )
        view = client.wait(task_id, timeout=90)
    assert view.status == "completed", view.failure
    assert [o["answer"] for o in view.outcomes] == ["Done. Last observation: 5", "Done. Last observation: 20"]
    assert (embedded.home / "umiq.db").exists()


def test_the_embedded_broker_never_hands_out_a_message_still_being_written(tmp_path: Path) -> None:
    from queue import Empty

    from kombu import Connection

    folder = tmp_path / "broker"
    folder.mkdir()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "store_processed": False}
    with Connection("umiqfs://", transport_options=options) as connection:
        channel = connection.default_channel
        (folder / "1_partial.planner.msg.part").write_bytes(b'{"body": "half')
        with pytest.raises(Empty):
            channel._get("planner")
        channel._put("planner", {"body": "whole"})
        assert channel._get("planner") == {"body": "whole"}
        assert [p.name for p in folder.iterdir()] == ["1_partial.planner.msg.part"]
