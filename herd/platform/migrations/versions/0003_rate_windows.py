"""Rate-limit windows in the database, so every process of a herd (and every herd on one
PostgreSQL) spends one budget per key.

Revision ID: 0003_rate_windows
Revises: 0002_files_batches
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_rate_windows"
down_revision = "0002_files_batches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_windows",
        sa.Column("limit_key", sa.String(100), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_windows")
