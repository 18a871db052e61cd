"""``store.pipelined``: the step result's writes in one round trip, with errors as the code outside would see them.

Real Postgres: a statement that fails inside the pipeline raises the SQLAlchemy error of its kind when the pipeline
ends, a connection killed under it is invalidated (the orchestrator's tasks retry on ``OperationalError``), and
SQLite runs the same block statement by statement.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from orchestrator.store import get_engine, pipelined

_METADATA = sa.MetaData()
_ROWS = sa.Table("pipelined_probe", _METADATA, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Text))


@pytest.fixture(params=["postgres", "sqlite"])
def db(request: pytest.FixtureRequest, pg_url: str, tmp_path) -> sa.Engine:
    engine = get_engine(pg_url) if request.param == "postgres" else get_engine(f"sqlite:///{tmp_path}/probe.db")
    _METADATA.drop_all(engine)
    _METADATA.create_all(engine)
    return engine


def test_writes_inside_land_together(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(sa.insert(_ROWS), {"id": 1, "v": "a"})
        with pipelined(conn):
            conn.execute(sa.insert(_ROWS).inline(), [{"id": 2, "v": "b"}, {"id": 3, "v": "c"}])
            conn.execute(sa.update(_ROWS).where(_ROWS.c.id == 1).values(v="z"))
            conn.execute(sa.insert(_ROWS).inline(), {"id": 4, "v": "d"})
    with db.connect() as conn:
        assert conn.execute(sa.select(_ROWS.c.id, _ROWS.c.v).order_by(_ROWS.c.id)).all() == [
            (1, "z"), (2, "b"), (3, "c"), (4, "d")
        ]


def test_a_failed_statement_raises_its_sqlalchemy_error_and_writes_nothing(db: sa.Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        with db.begin() as conn, pipelined(conn):
            conn.execute(sa.insert(_ROWS).inline(), {"id": 1, "v": "a"})
            conn.execute(sa.insert(_ROWS).inline(), {"id": 1, "v": "again"})
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(_ROWS)).scalar_one() == 0


def test_a_connection_killed_under_the_pipeline_is_an_invalidated_operational_error(pg_url: str) -> None:
    engine = get_engine(pg_url)
    _METADATA.drop_all(engine)
    _METADATA.create_all(engine)
    with pytest.raises(sa.exc.OperationalError) as raised:
        with engine.begin() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as killer:
                killer.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pipelined(conn):
                conn.execute(sa.insert(_ROWS).inline(), {"id": 1, "v": "a"})
    assert raised.value.connection_invalidated
    with engine.begin() as conn:  # the pool hands out a live connection afterwards
        conn.execute(sa.insert(_ROWS), {"id": 2, "v": "b"})
        assert conn.execute(sa.select(_ROWS.c.id)).scalars().all() == [2]
