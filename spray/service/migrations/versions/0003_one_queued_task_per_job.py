"""One queued task per job, enforced by the database: a partial unique index on
``tasks.job_id`` where ``status = 'queued'``.

Several server processes (``spray serve --workers N``) may queue the same job at the same
instant; each checks for a queued task first, but only the index makes the check and the
insert one step. Queued duplicates already in a database are failed (the oldest stays
queued) before the index is made.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

INDEX = "uq_tasks_one_queued_per_job"
QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    connection = op.get_bind()
    tasks = sa.table('tasks', sa.column('id', sa.Integer()), sa.column('job_id', sa.Integer()), sa.column('status', sa.String()), sa.column('message', sa.Text()))
    kept: dict[int, int] = {}
    for task_id, job_id in connection.execute(sa.select(tasks.c.id, tasks.c.job_id).where(tasks.c.status == 'queued').order_by(tasks.c.id)).all():
        if job_id in kept:
            connection.execute(tasks.update().where(tasks.c.id == task_id).values(status='failed', message=f"a duplicate of queued task {kept[job_id]}"))
        else:
            kept[job_id] = task_id
    op.create_index(INDEX, 'tasks', ['job_id'], unique=True, sqlite_where=QUEUED, postgresql_where=QUEUED)


def downgrade() -> None:
    op.drop_index(INDEX, table_name='tasks')
