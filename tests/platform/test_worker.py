"""The platform's database worker: many callers' operations in one transaction, an answer
(RateLimited) that is an exception, committed before the caller hears back, and one failing
operation that fails only its own caller."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from herd.platform.ledger import Ledger, UsageRecord
from herd.platform.worker import DatabaseWorker


class Refused(Exception):
    pass


def test_batches_answers_and_isolated_failures(db):
    worker = DatabaseWorker(db)
    ledger = Ledger(db)
    other = type(db)(db.url)  # another connection, as another process would read

    def refuse(conn):
        ledger.begin_in(conn, UsageRecord("kept-despite-refusal", "m", created_at=1.0))
        raise Refused("no")

    def broken(conn):
        db.cursor(conn).execute("INSERT INTO no_such_table VALUES (1)")

    async def main():
        futures = [worker.submit(lambda conn, i=i: ledger.end_in(
            conn, UsageRecord(f"r{i}", "m", status="finished", created_at=1.0))) for i in range(20)]
        futures += [worker.submit(refuse), worker.submit(broken)]
        worker.post(lambda conn: ledger.begin_in(conn, UsageRecord("posted", "m", created_at=1.0)))
        results = await asyncio.gather(*futures, return_exceptions=True)
        # Committed before the answer came: visible from another connection at once.
        with other.read() as conn:
            seen = conn.execute(text("SELECT count(*) FROM usage WHERE request_id LIKE 'r%'")).scalar()
        return results, seen

    results, seen = asyncio.run(main())
    assert results[:20] == [True] * 20 and seen == 20
    assert isinstance(results[20], Refused)
    assert isinstance(results[21], Exception) and not isinstance(results[21], Refused)
    worker.close()
    ids = {r.request_id for r in ledger.records()}
    assert {"kept-despite-refusal", "posted"} <= ids and len(ids) == 22
    other.close()


def test_close_runs_what_is_queued(db):
    worker = DatabaseWorker(db)
    ledger = Ledger(db)

    async def main():
        for i in range(50):
            worker.post(lambda conn, i=i: ledger.begin_in(conn, UsageRecord(f"q{i}", "m", created_at=1.0)))

    asyncio.run(main())
    worker.close()
    assert len(ledger.records()) == 50


def test_nothing_to_close(db):
    DatabaseWorker(db).close()  # never started: nothing happens
