"""The Alembic migrations build exactly the schema the models declare, on Postgres and on SQLite, and the newest one
can be taken back: a model changed without its migration (or the reverse) fails here, not in a deployment."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from orchestrator import store


@pytest.fixture(params=["postgres", "sqlite"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'umiq.db'}"
    return request.getfixturevalue("scratch_pg_url")


def _drift(url: str) -> list:
    """What autogenerate would write to bring the database to the models: nothing, if they agree."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), SQLModel.metadata)
    finally:
        engine.dispose()


def test_the_migrations_build_the_schema_the_models_declare(empty_database: str) -> None:
    store.migrate(empty_database)
    assert _drift(empty_database) == []


def test_the_newest_migration_goes_down_and_up_again(empty_database: str) -> None:
    config = store.alembic_config(empty_database)
    command.upgrade(config, "head")
    command.downgrade(config, "-1")
    assert _drift(empty_database) != []
    command.upgrade(config, "head")
    assert _drift(empty_database) == []
