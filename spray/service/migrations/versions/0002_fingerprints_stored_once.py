"""Fingerprints stored once: reviews point at a ``fingerprints`` row instead of each
carrying the reviewed flag's member ids; a flag's history read from an index in order.

A fingerprint lists every member id of the reviewed flag (tens of kB for a large class),
and every review of the same flag repeated it: a flag reviewed a few hundred times made the
reviews table tens of MB, every read of a review history went through pages the database's
cache could not hold. The rows are moved, not changed: each distinct fingerprint (by the
SHA-256 of its canonical JSON) becomes one ``fingerprints`` row. The index on ``subject``
becomes one on ``(subject, created, id)``, so the newest reviews of a flag are read in order
without a sort, and the one on ``job_key`` one on ``(job_key, subject)``, so a job's reviewed
flags are listed from the index alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

FOREIGN_KEY = "fk_reviews_fingerprint_id_fingerprints"


def digest(body: Any) -> str:
    """The SHA-256 of a fingerprint's canonical JSON (as ``spray.service.reviews`` makes it)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def upgrade() -> None:
    op.create_table('fingerprints',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('body', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('digest')
    )
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fingerprint_id', sa.Integer(), nullable=True))

    connection = op.get_bind()
    reviews = sa.table('reviews', sa.column('id', sa.Integer()), sa.column('fingerprint', sa.JSON()), sa.column('fingerprint_id', sa.Integer()))
    fingerprints = sa.table('fingerprints', sa.column('id', sa.Integer()), sa.column('digest', sa.String()), sa.column('body', sa.JSON()))
    stored: dict[str, int] = {}
    for review_id, body in connection.execute(sa.select(reviews.c.id, reviews.c.fingerprint).order_by(reviews.c.id)).all():
        key = digest(body)
        if key not in stored:
            stored[key] = connection.execute(fingerprints.insert().values(digest=key, body=body).returning(fingerprints.c.id)).scalar_one()
        connection.execute(reviews.update().where(reviews.c.id == review_id).values(fingerprint_id=stored[key]))

    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_column('fingerprint')
        batch_op.alter_column('fingerprint_id', existing_type=sa.Integer(), nullable=False)
        batch_op.create_foreign_key(FOREIGN_KEY, 'fingerprints', ['fingerprint_id'], ['id'])
        batch_op.create_index(batch_op.f('ix_reviews_fingerprint_id'), ['fingerprint_id'], unique=False)
        batch_op.drop_index('ix_reviews_subject')
        batch_op.create_index('ix_reviews_subject_created', ['subject', 'created', 'id'], unique=False)
        batch_op.drop_index('ix_reviews_job_key')
        batch_op.create_index('ix_reviews_job_subject', ['job_key', 'subject'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fingerprint', sa.JSON(), nullable=True))
    connection = op.get_bind()
    reviews = sa.table('reviews', sa.column('id', sa.Integer()), sa.column('fingerprint', sa.JSON()), sa.column('fingerprint_id', sa.Integer()))
    fingerprints = sa.table('fingerprints', sa.column('id', sa.Integer()), sa.column('body', sa.JSON()))
    bodies = dict(connection.execute(sa.select(fingerprints.c.id, fingerprints.c.body)).all())
    for review_id, fingerprint_id in connection.execute(sa.select(reviews.c.id, reviews.c.fingerprint_id)).all():
        connection.execute(reviews.update().where(reviews.c.id == review_id).values(fingerprint=bodies[fingerprint_id]))
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_index('ix_reviews_subject_created')
        batch_op.create_index('ix_reviews_subject', ['subject'], unique=False)
        batch_op.drop_index('ix_reviews_job_subject')
        batch_op.create_index('ix_reviews_job_key', ['job_key'], unique=False)
        batch_op.drop_index(batch_op.f('ix_reviews_fingerprint_id'))
        batch_op.drop_constraint(FOREIGN_KEY, type_='foreignkey')
        batch_op.drop_column('fingerprint_id')
        batch_op.alter_column('fingerprint', existing_type=sa.JSON(), nullable=False)
    op.drop_table('fingerprints')
