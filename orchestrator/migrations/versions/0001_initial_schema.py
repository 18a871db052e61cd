"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 17:02:08.313885
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('task',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('turns', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('toolsets', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('initial_config', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('options', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('meta', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('task', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_task_owner'), ['owner'], unique=False)

    op.create_table('toolcatalog',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('specs', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('stateful', sa.Boolean(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('trajectory',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('task_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('turn', sa.Integer(), nullable=False),
    sa.Column('planner_steps', sa.Integer(), nullable=False),
    sa.Column('turn_planner_steps', sa.Integer(), nullable=False),
    sa.Column('next_seq', sa.Integer(), nullable=False),
    sa.Column('tool_specs', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('outcomes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('failure', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('verdict', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['task_id'], ['task.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('trajectory', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_trajectory_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_trajectory_task_id'), ['task_id'], unique=False)

    op.create_table('step',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trajectory_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('turn', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('request', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('raw_text', sa.Text(), nullable=True),
    sa.Column('parsed', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('parse_error', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('tokens_in', sa.Integer(), nullable=True),
    sa.Column('tokens_out', sa.Integer(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('model_version', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['trajectory_id'], ['trajectory.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key'),
    sa.UniqueConstraint('trajectory_id', 'seq')
    )
    with op.batch_alter_table('step', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_step_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_step_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_step_trajectory_id'), ['trajectory_id'], unique=False)

    op.create_table('message',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trajectory_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('turn', sa.Integer(), nullable=False),
    sa.Column('speaker', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('step_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['step_id'], ['step.id'], ),
    sa.ForeignKeyConstraint(['trajectory_id'], ['trajectory.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('trajectory_id', 'seq')
    )
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_message_trajectory_id'), ['trajectory_id'], unique=False)

    op.create_table('toolcall',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trajectory_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('turn', sa.Integer(), nullable=False),
    sa.Column('caller_step_id', sa.Integer(), nullable=False),
    sa.Column('tool_step_id', sa.Integer(), nullable=True),
    sa.Column('tool', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('arguments', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('observation', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('hallucinated', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['caller_step_id'], ['step.id'], ),
    sa.ForeignKeyConstraint(['tool_step_id'], ['step.id'], ),
    sa.ForeignKeyConstraint(['trajectory_id'], ['trajectory.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('toolcall', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_toolcall_trajectory_id'), ['trajectory_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('toolcall', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_toolcall_trajectory_id'))

    op.drop_table('toolcall')
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_message_trajectory_id'))

    op.drop_table('message')
    with op.batch_alter_table('step', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_step_trajectory_id'))
        batch_op.drop_index(batch_op.f('ix_step_status'))
        batch_op.drop_index(batch_op.f('ix_step_kind'))

    op.drop_table('step')
    with op.batch_alter_table('trajectory', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_trajectory_task_id'))
        batch_op.drop_index(batch_op.f('ix_trajectory_status'))

    op.drop_table('trajectory')
    op.drop_table('toolcatalog')
    with op.batch_alter_table('task', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_task_owner'))

    op.drop_table('task')
