"""The Files and Batches APIs: files, batches and batch_results tables; usage rows marked batch.

Revision ID: 0002_files_batches
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_files_batches"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Integer, nullable=True),
        sa.Column("filename", sa.String(500), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("file_type", sa.String(16), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=True),
        sa.Column("upload_token_hash", sa.String(64), nullable=True),
    )
    op.create_index("ix_files_key_created", "files", ["key_id", "created_at"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Integer, nullable=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("metadata_json", sa.Text, nullable=True),
        sa.Column("errors_json", sa.Text, nullable=True),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("output_file_id", sa.String(64), nullable=True),
        sa.Column("error_file_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        *(sa.Column(f"{s}_at", sa.Float, nullable=True)
          for s in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")),
    )
    op.create_index("ix_batches_key_created", "batches", ["key_id", "created_at"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_results",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("custom_id", sa.String(200), nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("result_json", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("cached_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
    )
    with op.batch_alter_table("usage") as t:
        t.add_column(sa.Column("batch", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("usage") as t:
        t.drop_column("batch")
    op.drop_table("batch_results")
    op.drop_table("batches")
    op.drop_table("files")
