"""hot path indexes

Every result updates a step from queued to done and inserts the next step and one or two messages; an update that
changes an indexed column writes a new entry into every index of the table. The step table had six indexes and
the message table three, four of them never used by a query:

- ``ix_step_trajectory_id`` and ``ix_message_trajectory_id`` repeat the leading column of the (trajectory_id, seq)
  unique constraints, which serve the same lookups;
- ``ix_step_kind`` indexes four values, and no query filters on the kind alone;
- the unique ``idempotency_key`` is ``trajectory_id/seq`` as text: the (trajectory_id, seq) constraint already
  refuses a second step for a slot.

``ix_step_status`` becomes ``ix_step_queued``, holding queued steps only (what the sweeper looks for), so a finished
step leaves it; ``ix_step_finished_at`` serves ``/metrics``, which reads the steps finished in its window and had
read the whole table to find them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_QUEUED = sa.text("status = 'queued'")
_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
"""Names SQLite's unnamed unique constraints get when batch mode reflects the table, so one can be dropped by name."""


def _idempotency_constraint() -> str:
    return "step_idempotency_key_key" if op.get_bind().dialect.name == "postgresql" else "uq_step_idempotency_key"


def upgrade() -> None:
    with op.batch_alter_table('step', schema=None, naming_convention=_NAMES) as batch_op:
        batch_op.drop_index('ix_step_trajectory_id')
        batch_op.drop_index('ix_step_kind')
        batch_op.drop_index('ix_step_status')
        batch_op.drop_constraint(_idempotency_constraint(), type_='unique')
    op.create_index('ix_step_queued', 'step', ['status'], postgresql_where=_QUEUED, sqlite_where=_QUEUED)
    op.create_index('ix_step_finished_at', 'step', ['finished_at'])
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('ix_message_trajectory_id')


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.create_index('ix_message_trajectory_id', ['trajectory_id'], unique=False)
    op.drop_index('ix_step_finished_at', table_name='step')
    op.drop_index('ix_step_queued', table_name='step')
    with op.batch_alter_table('step', schema=None, naming_convention=_NAMES) as batch_op:
        batch_op.create_unique_constraint(_idempotency_constraint(), ['idempotency_key'])
        batch_op.create_index('ix_step_status', ['status'], unique=False)
        batch_op.create_index('ix_step_kind', ['kind'], unique=False)
        batch_op.create_index('ix_step_trajectory_id', ['trajectory_id'], unique=False)
