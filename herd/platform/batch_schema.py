"""The Files and Batches APIs' tables (SQLAlchemy Core, on the platform's metadata). Changing them
needs a migration in migrations/versions (0002 made them)."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Index, Integer, String, Table, Text

from herd.platform.schema import metadata

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),  # file-<hex>
    Column("key_id", Integer, nullable=True),  # the owner; None: uploaded while the server was open
    Column("filename", String(500), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    # uploaded | processed (OpenAI); pending: a together 3-step upload still waiting for its PUT
    Column("status", String(16), nullable=False),
    Column("file_type", String(16), nullable=False, default="jsonl"),
    Column("checksum", String(64), nullable=True),  # sha256 hex the client announced (together)
    Column("upload_token_hash", String(64), nullable=True),  # sha256 of the PUT URL's token
)
Index("ix_files_key_created", files.c.key_id, files.c.created_at)

batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),  # batch_<hex>
    Column("key_id", Integer, nullable=True),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    # validating | in_progress | finalizing | completed | failed | expired | cancelling | cancelled
    Column("status", String(16), nullable=False),
    Column("model", String(200), nullable=True),
    Column("metadata_json", Text, nullable=True),
    Column("errors_json", Text, nullable=True),  # [{code, line, message, param}]
    Column("total", Integer, nullable=False, default=0),
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("in_progress_at", Float, nullable=True),
    Column("finalizing_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("expired_at", Float, nullable=True),
    Column("cancelling_at", Float, nullable=True),
    Column("cancelled_at", Float, nullable=True),
)
Index("ix_batches_key_created", batches.c.key_id, batches.c.created_at)
Index("ix_batches_status", batches.c.status)

# One row per finished input line, written in the same transaction as its ledger row: a line
# with a row here is never run again (restart-safe, exactly once).
batch_results = Table(
    "batch_results",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("line", Integer, primary_key=True),  # 1-based line number in the input file
    Column("custom_id", String(200), nullable=False),
    Column("ok", Boolean, nullable=False),  # False: goes to the error file
    Column("result_json", Text, nullable=False),  # the output line, without its newline
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
)
