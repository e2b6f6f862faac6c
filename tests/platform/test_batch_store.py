"""The batch tables on their own (SQLite and PostgreSQL): a line's result and ledger row are
written together and only once; files are per key; batch rows show apart in usage summaries."""

from __future__ import annotations

import io
import time

import pytest

from herd.platform.batches import BatchStore
from herd.platform.config import PlatformConfig
from herd.platform.files import FileError, FileStore
from herd.platform.keys import KeyStore
from herd.platform.ledger import Ledger, UsageRecord
from herd.platform.ratelimit import RateLimiter


def _row(request_id, key_id, batch, **kw):
    row = UsageRecord(request_id=request_id, model="m", key_id=key_id, status="finished", created_at=time.time(),
                      prompt_tokens=10, completion_tokens=5, cost_usd=1.0, **kw).row()
    row["batch"] = batch
    return row


def test_a_line_is_recorded_once_with_its_ledger_row(db):
    store = BatchStore(db)
    b = store.create(None, endpoint="/v1/chat/completions", input_file_id="file-x")
    assert b.status == "validating" and b.expires_at == pytest.approx(b.created_at + 86400)
    assert store.record_line(b.id, 1, "a", ok=True, result={"x": 1}, prompt_tokens=10, completion_tokens=5,
                             usage_row=_row(f"{b.id}-1", None, True))
    # Again (a resumed runner racing a finished line): nothing is written, nothing billed twice.
    assert not store.record_line(b.id, 1, "a", ok=True, result={"x": 2}, usage_row=_row(f"{b.id}-1", None, True))
    assert store.results(b.id, True) == ['{"x":1}'] and store.done_lines(b.id) == {1}
    assert len(Ledger(db, PlatformConfig()).records()) == 1
    got = store.get_any(b.id)
    assert (got.completed, got.failed, got.prompt_tokens, got.completion_tokens) == (1, 0, 10, 5)
    assert store.transition(b.id, "cancelling", only_from=("validating", "in_progress"))
    assert not store.transition(b.id, "in_progress", only_from=("validating",))  # cancel won
    assert store.get_any(b.id).times["cancelling_at"] is not None


def test_batch_rows_show_apart_in_summaries(db):
    key = KeyStore(db).create("k")[0]
    ledger = Ledger(db, PlatformConfig())
    with db.write() as conn:
        from herd.platform.schema import usage

        conn.execute(usage.insert().values(**_row("online", key.id, False)))
        conn.execute(usage.insert().values(**_row("batchline", key.id, True)))
    # The rate windows never read the ledger: batch lines count in the key's batch pool only.
    limiter = RateLimiter(db)
    limiter.admit(f"batch:{key.id}", 15, rpm=5, tpm=0)
    assert limiter.snapshot(key.id, 5, 0).requests_remaining == 5
    assert limiter.snapshot(f"batch:{key.id}", 5, 0).requests_remaining == 4
    (summary,) = ledger.summary(by=("key",))
    assert (summary["requests"], summary["batch_requests"], summary["batch_tokens"]) == (2, 1, 15)
    assert summary["batch_cost_usd"] == pytest.approx(1.0)


def test_files_are_per_key_and_uploads_need_their_token(db, tmp_path):
    files = FileStore(db, tmp_path / "files", max_bytes=100)
    rec = files.create(1, "a.jsonl", "batch", [b"{}\n"])
    assert files.get(rec.id, 1).bytes == 3
    assert files.get(rec.id, 2) is None and files.get(rec.id, None) is None
    assert not files.delete(rec.id, 2) and files.path(rec.id).is_file()
    with pytest.raises(FileError, match="over 100 bytes"):
        files.create(1, "big.jsonl", "batch", [b"x" * 101])
    pending, token = files.create_pending(1, "t.jsonl", "batch-api", "jsonl", None)
    assert files.list(1)[0] == [rec]  # pending files are not listed
    with pytest.raises(FileError):
        files.put_content(pending.id, "wrong", [b"{}\n"])
    assert files.put_content(pending.id, token, FileStore.chunks_of(io.BytesIO(b"{}\n"))).status == "uploaded"
    with pytest.raises(FileError):
        files.put_content(pending.id, token, [b"{}\n"])  # used up
    assert files.mark_processed(pending.id, 1).status == "processed"
    assert files.delete(rec.id, 1) and not files.path(rec.id).exists()
