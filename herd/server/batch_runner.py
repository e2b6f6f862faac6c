"""The batch runner: inside the server process, it takes batches from the database and feeds
their lines to the engine through the same code as the online routes (batch_lines.run_line),
at a worse priority than interactive requests and at most `batch.max_in_flight` lines at once.

Everything it knows is in the database, so it survives a restart: on start it picks up every
batch still validating, in progress, finalizing or cancelling, and runs only the lines that have
no result row yet (a result row and the line's ledger row are written in one transaction).
Lines in flight when the server stops are not recorded: they run again after the restart. A
line answered 5xx is tried again (MAX_ATTEMPTS in all) before it goes to the error file.

While interactive requests are being served, at most `batch.busy_max_in_flight` lines run
(benchmarks/bench_batch.py: every batch line decoding in a step makes the step, which the
interactive requests wait on, longer).
"""

from __future__ import annotations

import asyncio
import logging
import time

from herd.platform.batch_config import BatchConfig
from herd.platform.batches import BatchRecord, BatchStore
from herd.platform.files import FileStore
from herd.platform.ledger import UsageRecord
from herd.platform.ratelimit import RateLimited, lock_id
from herd.server.batch_lines import Line, output_line, read_lines, run_line, usage_of

log = logging.getLogger("herd.batch")

POLL_SECONDS = 1.0
RETRY_SECONDS = 2.0
SWEEP_SECONDS = 600.0
BUSY_GRACE_SECONDS = 2.0
BUSY_POLL_SECONDS = 0.02
MAX_ATTEMPTS = 3  # a line failing with 5xx this often is recorded as failed


class BatchRunner:
    def __init__(self, st, platform, files: FileStore, store: BatchStore, config: BatchConfig):
        self.st = st
        self.platform = platform
        self.files = files
        self.store = store
        self.config = config
        self.slots = asyncio.Semaphore(config.max_in_flight)  # lines in the engine, all batches
        self.pool = platform.limiter  # in the database, like interactive limits; batch lines count under their own key
        self.running = 0  # lines holding a slot
        self._last_interactive = -BUSY_GRACE_SECONDS
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancels: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._main: asyncio.Task | None = None

    # -- how many lines run --------------------------------------------------------------------------
    async def _acquire(self, cancelled: asyncio.Event) -> None:
        """A slot for one more line: at most max_in_flight, and while interactive requests are
        being served (or were, BUSY_GRACE_SECONDS ago) at most busy_max_in_flight, so that the
        engine's steps, which every interactive request waits on, stay small."""
        await self.slots.acquire()
        while self.running >= self.config.busy_max_in_flight and self._interactive_busy() and not cancelled.is_set():
            await asyncio.sleep(BUSY_POLL_SECONDS)
        self.running += 1

    def _release(self) -> None:
        self.running -= 1
        self.slots.release()

    def _interactive_busy(self) -> bool:
        now = time.monotonic()
        if self.st.pending > 0:  # interactive requests admitted (batch lines are not admitted there)
            self._last_interactive = now
        return now - self._last_interactive < BUSY_GRACE_SECONDS

    # -- lifetime ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._main = asyncio.get_running_loop().create_task(self._watch(), name="herd-batch-runner")

    async def stop(self) -> None:
        """Stops at once; lines in flight are dropped unrecorded and run again after a restart."""
        tasks = [t for t in (self._main, *self.tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    def notify(self) -> None:
        """A batch was created: look now rather than at the next poll."""
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """The batch is marked cancelling in the database: stop starting its lines, drop those in flight."""
        self.cancels.setdefault(batch_id, asyncio.Event()).set()
        self._wake.set()

    async def _watch(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                if time.monotonic() - last_sweep > SWEEP_SECONDS:  # files past their expires_at
                    last_sweep = time.monotonic()
                    await asyncio.to_thread(self.files.expire)
                ids = await asyncio.to_thread(self.store.active_ids)
                for batch_id in ids:
                    task = self.tasks.get(batch_id)
                    if task is None or task.done():
                        self.tasks[batch_id] = asyncio.get_running_loop().create_task(self._run(batch_id))
                for batch_id in [b for b, t in self.tasks.items() if t.done()]:
                    del self.tasks[batch_id]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch runner: could not read the batches")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass

    # -- one batch ---------------------------------------------------------------------------------
    async def _run(self, batch_id: str) -> None:
        try:
            b = await asyncio.to_thread(self.store.get_any, batch_id)
            if b is None:
                return
            if b.status == "validating":
                b = await self._validate(b)
            if b is not None and b.status == "in_progress":
                b = await self._run_lines(b)
            if b is not None and b.status in ("finalizing", "cancelling"):
                await self._finalize(b)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or a broken file must not stop the other batches
            log.exception("batch %s failed", batch_id)
            error = {"code": "server_error", "line": None, "message": f"{type(e).__name__}: {e}", "param": None}
            await asyncio.to_thread(self.store.transition, batch_id, "failed",
                                    only_from=("validating", "in_progress", "finalizing"), errors=[error])

    async def _read(self, b: BatchRecord) -> tuple[list[Line], list[dict]]:
        path = self.files.path(b.input_file_id)
        if not path.is_file():
            return [], [{"code": "file_not_found", "line": None, "param": "input_file_id",
                         "message": f"the input file {b.input_file_id} is gone"}]
        return await asyncio.to_thread(read_lines, path, b.endpoint, models=self.st.model_names,
                                       max_lines=self.config.max_lines)

    async def _validate(self, b: BatchRecord) -> BatchRecord | None:
        lines, errors = await self._read(b)
        size = self.files.path(b.input_file_id).stat().st_size if not errors else 0
        if size > self.config.max_file_bytes:
            errors = [{"code": "file_too_large", "line": None, "param": "input_file_id",
                       "message": f"the input file has {size} bytes; a batch takes at most {self.config.max_file_bytes}"}]
        if errors:
            await asyncio.to_thread(self.store.transition, b.id, "failed", only_from=("validating",), errors=errors)
            return None
        model = next((ln.body["model"] for ln in lines if ln.body.get("model")), None)
        await asyncio.to_thread(self.store.transition, b.id, "in_progress", only_from=("validating",),
                                total=len(lines), model=model or self.st.model_name)
        return await asyncio.to_thread(self.store.get_any, b.id)

    async def _run_lines(self, b: BatchRecord) -> BatchRecord | None:
        lines, errors = await self._read(b)
        if errors:  # the file changed under a running batch
            await asyncio.to_thread(self.store.transition, b.id, "failed", only_from=("in_progress",), errors=errors)
            return None
        done = await asyncio.to_thread(self.store.done_lines, b.id)
        cancelled = self.cancels.setdefault(b.id, asyncio.Event())
        in_flight: set[asyncio.Task] = set()
        try:
            return await self._dispatch(b, lines, done, cancelled, in_flight)
        except asyncio.CancelledError:  # the server is stopping: lines in flight run again later
            for t in list(in_flight):
                t.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise

    async def _dispatch(self, b, lines, done, cancelled, in_flight) -> BatchRecord | None:
        expired = False
        for line in lines:
            if line.number in done:
                continue
            await self._acquire(cancelled)
            if cancelled.is_set():
                self._release()
                break
            if self.platform.clock() > b.expires_at:  # past the completion window
                self._release()
                expired = True
                break
            try:
                charge = await self._take_from_pool(b, cancelled)
            except BaseException:
                self._release()
                raise
            if charge is False:  # cancelled while waiting for the pool
                self._release()
                break
            task = asyncio.get_running_loop().create_task(self._line(b, line, charge))
            in_flight.add(task)
            task.add_done_callback(lambda t: (self._release(), in_flight.discard(t)))
        if cancelled.is_set() or expired:
            for t in list(in_flight):
                t.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        if expired:
            await self._expire(b)
            return None
        if not cancelled.is_set():
            await asyncio.to_thread(self.store.transition, b.id, "finalizing", only_from=("in_progress",))
        return await asyncio.to_thread(self.store.get_any, b.id)

    async def _take_from_pool(self, b: BatchRecord, cancelled: asyncio.Event):
        """A slot in the key's batch rate-limit pool (separate from its interactive limits);
        waits while the pool is full. None: no pool; False: cancelled while waiting."""
        rpm, tpm = self.config.rpm, self.config.tpm
        if b.key_id is None or not (rpm or tpm):
            return None
        while True:
            try:
                pool_key = f"batch:{b.key_id}"  # the key's batch pool, apart from its interactive window
                charge, _ = await self.platform.worker.submit(
                    lambda conn: self.pool.admit_in(conn, pool_key, 0, rpm, tpm), lock=lock_id(pool_key))
                return charge
            except RateLimited as e:
                try:
                    await asyncio.wait_for(cancelled.wait(), max(e.retry_after, 0.05))
                    return False
                except asyncio.TimeoutError:
                    pass

    async def _line(self, b: BatchRecord, line: Line, charge) -> None:
        started, created_at = time.monotonic(), time.time()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            status, body = await run_line(self.st, line.url, line.body, priority=self.config.priority)
            if status < 500 or attempt == MAX_ATTEMPTS:
                break
            # 5xx: the engine was stopping or failed a step; try again, then give up on the line.
            await asyncio.sleep(RETRY_SECONDS)
        prompt, completion, cached = usage_of(body) if status == 200 else (0, 0, 0)
        if charge is not None:
            self.platform.worker.post(lambda conn: self.pool.settle_in(conn, charge, prompt + completion))
        request_id = f"{b.id}-{line.number}"
        price = self.platform.config.price_for(self.st.model_name)
        discount = self.config.discount
        record = UsageRecord(
            request_id=request_id, model=self.st.model_name, key_id=b.key_id, path=line.url,
            status="finished" if status == 200 else "failed", created_at=created_at,
            latency_s=time.monotonic() - started, prompt_tokens=prompt, cached_tokens=cached,
            completion_tokens=completion, cost_usd=price.cost(prompt, completion, cached) * (1 - discount),
            http_status=status, response_id=(body or {}).get("id") if status == 200 else None,
            error=None if status == 200 else str(((body or {}).get("error") or {}).get("message"))[:500],
        )
        row = record.row()
        row["batch"] = True
        result = output_line(line.custom_id, status, body, request_id)
        await asyncio.shield(asyncio.to_thread(
            self.store.record_line, b.id, line.number, line.custom_id, ok=status == 200, result=result,
            prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion, usage_row=row,
        ))

    async def _expire(self, b: BatchRecord) -> None:
        """Past the completion window: lines not done go to the error file as batch_expired."""
        lines, _ = await self._read(b)
        done = await asyncio.to_thread(self.store.done_lines, b.id)
        for line in lines:
            if line.number not in done:
                error = {"code": "batch_expired", "message": "This request could not be executed before the "
                                                             "completion window expired."}
                await asyncio.to_thread(self.store.record_line, b.id, line.number, line.custom_id, ok=False,
                                        result=output_line(line.custom_id, 0, None, None, error))
        await self._finalize(await asyncio.to_thread(self.store.get_any, b.id), final="expired")

    async def _finalize(self, b: BatchRecord, final: str | None = None) -> None:
        """Writes the output and error files (ids fixed by the batch's, so doing it again after a
        crash replaces them) and moves the batch to its final status."""
        final = final or ("cancelled" if b.status == "cancelling" else "completed")
        stem = b.id.removeprefix("batch_")
        ids = {}
        for ok, kind in ((True, "output"), (False, "errors")):
            results = await asyncio.to_thread(self.store.results, b.id, ok)
            if not results:
                ids[kind] = None
                continue
            data = ("\n".join(results) + "\n").encode()
            rec = await asyncio.to_thread(
                self.files.create, b.key_id, f"{b.id}_{kind}.jsonl", "batch_output", [data],
                file_id=f"file-{stem}-{kind}",
            )
            ids[kind] = rec.id
        await asyncio.to_thread(self.store.transition, b.id, final, only_from=(b.status,),
                                output_file_id=ids["output"], error_file_id=ids["errors"])
        self.cancels.pop(b.id, None)
        log.info("batch %s %s: %d succeeded, %d failed", b.id, final, b.completed, b.failed)
