"""Alembic environment: herd always hands in an open connection (herd.platform.db.Database.migrate),
inside a transaction that holds the database's migration lock."""

from alembic import context

from herd.platform.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
