"""The Files and Batches APIs on the real server, driven by the openai and together SDKs: every
custom_id once, bodies equal to the online ones, ledger rows marked batch at the discount,
validation errors, cancel, and one key never seeing another's files."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import openai
import pytest

from herd.platform.batch_config import BatchConfig
from herd.platform.config import PlatformConfig
from herd.platform.db import Database
from herd.platform.keys import KeyStore
from herd.platform.schema import usage
from herd.platform.service import Platform
from tests.server.conftest import running_server, wait_until

MODEL = "demo"


@contextlib.contextmanager
def serve(engine, tmp_path, **batch):
    from herd.server import ServerOptions, create_app

    config = PlatformConfig(batch=BatchConfig(files_dir=str(tmp_path / "files"), **batch))
    platform = Platform(config, Database(f"sqlite:///{tmp_path / 'herd.db'}"))
    app = create_app(engine, ServerOptions(owns_engine=False, served_model_names=[MODEL]), platform=platform)
    with running_server(app) as url:
        yield url, platform


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def chat_line(i, content=None, max_tokens=4, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content or f"Count to {i}"}],
            "max_tokens": max_tokens, "temperature": 0, **extra}
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_jsonl(path, items):
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def wait_batch(c, batch_id, done=("completed", "failed", "cancelled", "expired"), timeout=60):
    seen = {}

    def look():
        seen["b"] = c.batches.retrieve(batch_id)
        return seen["b"].status in done

    assert wait_until(look, timeout, 0.1), seen.get("b")
    return seen["b"]


def batch_rows(platform):
    with platform.db.read() as conn:
        return conn.execute(usage.select().where(usage.c.batch.is_(True))).mappings().all()


def test_openai_sdk_flow_bodies_equal_online(engine, tmp_path):
    with serve(engine, tmp_path) as (url, platform):
        c = client(url)
        lines = [chat_line(i) for i in range(3)] + [
            {**chat_line(3), "body": {**chat_line(3)["body"], "max_tokens": -1}},  # a 400: the error file
        ]
        f = c.files.create(file=write_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
        assert (f.object, f.purpose, f.filename, f.status) == ("file", "batch", "in.jsonl", "processed")
        assert f.bytes == (tmp_path / "in.jsonl").stat().st_size and f.expires_at > f.created_at
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"job": "nightly"})
        assert (b.object, b.status, b.metadata) == ("batch", "validating", {"job": "nightly"})
        b = wait_batch(c, b.id)
        assert b.status == "completed", b
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (4, 3, 1)
        assert b.completed_at >= b.finalizing_at >= b.in_progress_at >= b.created_at
        out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
        err = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
        assert [o["custom_id"] for o in out] == ["req-0", "req-1", "req-2"]
        assert [e["custom_id"] for e in err] == ["req-3"]
        assert err[0]["response"]["status_code"] == 400 and err[0]["response"]["body"]["error"]["param"] == "max_tokens"
        for line, o in zip(lines, out):
            assert o["response"]["status_code"] == 200 and o["error"] is None
            online = c.chat.completions.with_raw_response.create(**line["body"]).http_response.json()
            got = o["response"]["body"]
            # The same body but for the response's own id and time.
            assert {k: v for k, v in got.items() if k not in ("id", "created", "usage")} == \
                {k: v for k, v in online.items() if k not in ("id", "created", "usage")}
            assert got["usage"]["prompt_tokens"] == online["usage"]["prompt_tokens"]
            assert got["usage"]["completion_tokens"] == online["usage"]["completion_tokens"]
        assert b.usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in out)
        # One ledger row per line, marked batch, at half price; the failed line costs nothing.
        rows = batch_rows(platform)
        assert sorted(r["request_id"] for r in rows) == sorted(f"{b.id}-{n}" for n in (1, 2, 3, 4))
        price = platform.config.price_for(MODEL)
        for r in rows:
            full = price.cost(r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"])
            assert r["cost_usd"] == pytest.approx(full * 0.5)
            assert r["status"] == ("failed" if r["request_id"].endswith("-4") else "finished")
        # /v1/usage shows the batch lines apart.
        total = httpx.get(url + "/v1/usage").json()["total"]
        assert total["batch_requests"] == 4 and total["requests"] >= 4 + 3
        assert total["batch_cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))
        # Lists: OpenAI's page shape, newest first.
        page = c.batches.list(limit=10)
        assert [x.id for x in page.data] == [b.id] and page.has_more is False
        names = {x.filename for x in c.files.list().data}
        assert {"in.jsonl", f"{b.id}_output.jsonl", f"{b.id}_errors.jsonl"} == names
        assert c.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve(f.id)


def test_together_sdk_flow(engine, tmp_path, monkeypatch):
    together = pytest.importorskip("together")
    with serve(engine, tmp_path) as (url, platform):
        t = together.Together(base_url=url, api_key="none", max_retries=0)
        lines = [{"custom_id": f"t-{i}", "body": chat_line(i)["body"]} for i in range(2)]  # no url: together's form
        path = write_jsonl(tmp_path / "together.jsonl", lines)
        f = t.files.upload(path, purpose="batch-api", check=False)
        assert f.id.startswith("file-") and f.bytes == path.stat().st_size and f.purpose == "batch-api"
        assert t.files.retrieve(f.id).filename == "together.jsonl"
        created = t.batches.create(endpoint="/v1/chat/completions", input_file_id=f.id)
        job = created.job
        assert job.status == "VALIDATING" and job.file_size_bytes == path.stat().st_size
        deadline = time.monotonic() + 60
        while job.status not in ("COMPLETED", "FAILED") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = t.batches.retrieve(job.id)
        assert job.status == "COMPLETED" and job.progress == 100
        listed = t.batches.list()
        assert [j.id for j in listed] == [job.id]
        out = [json.loads(x) for x in t.files.content(job.output_file_id).read().decode().splitlines()]
        assert sorted(o["custom_id"] for o in out) == ["t-0", "t-1"]
        # The same batch through the openai SDK: lower-case status, integer times.
        assert client(url).batches.retrieve(job.id).status == "completed"
        # Cancelling a finished batch is refused; a running one is cancelled (see below).
        with pytest.raises(together.APIStatusError):
            t.batches.cancel(job.id)


def test_upload_put_needs_the_url_token_not_a_key(engine, tmp_path):
    with serve(engine, tmp_path) as (url, platform):
        _, secret = KeyStore(platform.db).create("alice")
        auth = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=url, timeout=30) as h:
            r = h.post("/v1/files", data={"purpose": "batch-api", "file_name": "x.jsonl", "file_type": "jsonl"},
                       headers=auth, follow_redirects=False)
            assert r.status_code == 302
            location, file_id = r.headers["location"], r.headers["x-together-file-id"]
            assert h.put(location.replace("upload_token=", "upload_token=x"), content=b"{}\n").status_code == 404
            assert h.put(location, content=b'{"custom_id":"a","body":{}}\n').status_code == 200
            assert h.put(location, content=b"again\n").status_code in (404, 409)  # a one-time URL
            assert h.post(f"/v1/files/{file_id}/preprocess", headers=auth).json()["status"] == "processed"
            assert h.get(f"/v1/files/{file_id}/content", headers=auth).content == b'{"custom_id":"a","body":{}}\n'
            # Without a key nothing else gets through.
            assert h.get(f"/v1/files/{file_id}/content").status_code == 401


def test_one_key_never_sees_another_keys_files_or_batches(engine, tmp_path):
    with serve(engine, tmp_path) as (url, platform):
        keys = KeyStore(platform.db)
        _, a = keys.create("a")
        _, b = keys.create("b")
        ca, cb = client(url, a), client(url, b)
        f = ca.files.create(file=write_jsonl(tmp_path / "a.jsonl", [chat_line(0)]).open("rb"), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            cb.files.retrieve(f.id)
        with pytest.raises(openai.NotFoundError):
            cb.files.content(f.id)
        with pytest.raises(openai.NotFoundError):
            cb.files.delete(f.id)
        with pytest.raises(openai.NotFoundError):
            cb.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert cb.files.list().data == []
        batch = ca.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            cb.batches.retrieve(batch.id)
        assert cb.batches.list().data == []
        assert wait_batch(ca, batch.id).status == "completed"


@pytest.mark.parametrize(
    "lines, code",
    [
        (["{not json"], "invalid_json_line"),
        ([chat_line(0), chat_line(0)], "duplicate_custom_id"),
        ([{**chat_line(0), "url": "/v1/embeddings"}], "url_mismatch"),
        ([chat_line(0), {**chat_line(1), "body": {**chat_line(1)["body"], "model": "other"}}], "model_mismatch"),
        ([{**chat_line(0), "body": {**chat_line(0)["body"], "model": "unknown"}}], "model_not_found"),
        ([], "empty_file"),
        ([chat_line(i) for i in range(4)], "too_many_tasks"),
    ],
)
def test_validation_errors_fail_the_batch(engine, tmp_path, lines, code):
    with serve(engine, tmp_path, max_lines=3) as (url, platform):
        c = client(url)
        f = c.files.create(file=write_jsonl(tmp_path / "bad.jsonl", lines).open("rb"), purpose="batch")
        b = wait_batch(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                           completion_window="24h").id)
        assert b.status == "failed" and b.failed_at is not None
        assert code in [e.code for e in b.errors.data], b.errors
        assert all(e.line is not None for e in b.errors.data if e.code != "empty_file")
        assert batch_rows(platform) == []


def test_bad_create_requests_are_400s(engine, tmp_path):
    with serve(engine, tmp_path) as (url, platform):
        c = client(url)
        f = c.files.create(file=write_jsonl(tmp_path / "a.jsonl", [chat_line(0)]).open("rb"), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="endpoint"):
            c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="completion_window"):
            c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
        with pytest.raises(openai.NotFoundError):
            c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            c.files.create(file=(tmp_path / "a.jsonl").open("rb"), purpose="nonsense")


def test_cancel_mid_batch_keeps_what_is_done(engine, tmp_path):
    with serve(engine, tmp_path, max_in_flight=1) as (url, platform):
        c = client(url)
        lines = [chat_line(i, max_tokens=24) for i in range(30)]
        f = c.files.create(file=write_jsonl(tmp_path / "many.jsonl", lines).open("rb"), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_until(lambda: c.batches.retrieve(b.id).request_counts.completed >= 2, 60, 0.05)
        cancelling = c.batches.cancel(b.id)
        assert cancelling.status in ("cancelling", "cancelled")
        b = wait_batch(c, b.id)
        assert b.status == "cancelled" and b.cancelled_at >= b.cancelling_at
        done = b.request_counts.completed
        assert 2 <= done < 30
        out = [json.loads(x)["custom_id"] for x in c.files.content(b.output_file_id).text.splitlines()]
        assert len(out) == len(set(out)) == done
        assert len(batch_rows(platform)) == done  # only finished lines are billed
        time.sleep(0.5)
        assert c.batches.retrieve(b.id).request_counts.completed == done  # nothing started after cancel


def test_batch_lines_have_their_own_rate_limit_pool(engine, tmp_path):
    """[batch] rpm paces a key's batch lines (waiting, never failing them); the key's interactive
    requests are not charged for them."""
    from herd.platform.config import Limits
    from herd.server import ServerOptions, create_app

    config = PlatformConfig(limits=Limits(rpm=2, window_seconds=2),
                            batch=BatchConfig(files_dir=str(tmp_path / "files"), rpm=1))
    platform = Platform(config, Database(f"sqlite:///{tmp_path / 'herd.db'}"))
    _, secret = KeyStore(platform.db).create("k")
    app = create_app(engine, ServerOptions(owns_engine=False, served_model_names=[MODEL]), platform=platform)
    with running_server(app) as url:
        c = client(url, secret)
        f = c.files.create(file=write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)]).open("rb"),
                           purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        start = time.monotonic()
        b = wait_batch(c, b.id)
        assert b.status == "completed" and b.request_counts.completed == 3
        assert time.monotonic() - start >= 3.5  # one line per 2 s window: the third starts after 4 s
        # The batch used none of the key's interactive requests per minute.
        raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                          max_tokens=1)
        assert raw.headers["x-ratelimit-remaining"] == "1"


def test_runner_holds_back_while_interactive_requests_run(monkeypatch):
    """At most busy_max_in_flight lines start while interactive requests are admitted (and for a
    grace period after); max_in_flight otherwise."""
    import asyncio
    import types

    from herd.server import batch_runner

    monkeypatch.setattr(batch_runner, "BUSY_GRACE_SECONDS", 0.2)
    st = types.SimpleNamespace(pending=0)
    platform = types.SimpleNamespace(config=PlatformConfig(), clock=time.time, limiter=None)

    async def scenario():
        runner = batch_runner.BatchRunner(st, platform, None, None, BatchConfig(max_in_flight=3, busy_max_in_flight=1))
        never = asyncio.Event()
        for _ in range(3):
            await asyncio.wait_for(runner._acquire(never), 1)  # idle: all three slots
        for _ in range(3):
            runner._release()
        st.pending = 1  # an interactive request is running
        await asyncio.wait_for(runner._acquire(never), 1)
        second = asyncio.ensure_future(runner._acquire(never))
        await asyncio.sleep(0.3)
        assert not second.done()  # held back
        st.pending = 0
        await asyncio.wait_for(second, 1)  # released once the grace period has passed
        assert runner.running == 2

    asyncio.run(scenario())


def test_past_its_window_a_batch_expires(engine, tmp_path):
    """Lines not run when the completion window ends go to the error file as batch_expired;
    finished ones stay in the output."""
    with serve(engine, tmp_path, max_in_flight=1) as (url, platform):
        c = client(url)
        lines = [chat_line(i, max_tokens=16) for i in range(20)]
        f = c.files.create(file=write_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_until(lambda: c.batches.retrieve(b.id).request_counts.completed >= 1, 60, 0.05)
        platform.clock = lambda: time.time() + 2 * 86400  # two days later
        b = wait_batch(c, b.id)
        assert b.status == "expired" and b.expired_at is not None
        done, failed = b.request_counts.completed, b.request_counts.failed
        assert done >= 1 and done + failed == 20
        errors = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
        assert {e["error"]["code"] for e in errors} == {"batch_expired"} and len(errors) == failed
        assert all(e["response"] is None for e in errors)
        assert len(batch_rows(platform)) == done  # expired lines cost nothing

