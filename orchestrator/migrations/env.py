"""Alembic environment for umiq's store: the target metadata is the SQLModel tables of orchestrator.store."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlmodel import SQLModel

from orchestrator import store  # noqa: F401  (registers the tables on SQLModel.metadata)

_PG_MIGRATION_LOCK = 0x756D6971  # "umiq": several services may start together and migrate at once


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = store.get_engine(url)
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        context.configure(
            connection=connection,
            target_metadata=SQLModel.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
