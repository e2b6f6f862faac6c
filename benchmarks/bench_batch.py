"""Interactive latency while a batch runs, and the batch's throughput.

One engine, one process: the server (platform on, SQLite and files in a temp dir) runs in a
thread, served by uvicorn. For each setting of the batch runner (how many lines it keeps in the
engine, `[batch] max_in_flight`, how many while interactive requests are being served,
`[batch] busy_max_in_flight`, and the priority its lines run at, `[batch] priority`) a
--lines-line batch is submitted through the openai SDK; once it is running, --probes interactive
streamed chat requests are sent one after another and their time to first token (TTFT) is
measured; then the batch is cancelled and the next setting starts on a fresh app (same engine).
The idle TTFT is measured the same way with no batch on the same app just before each batch (the
ratio the table gives), and before and after all settings (the machine is shared: they show its
drift). Batch throughput is the lines (and completion
tokens) the batch finished per second while the probes ran; with --complete the first setting's
batch instead runs to the end and its whole-batch throughput is reported.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_batch.py                  # default model
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_batch.py --model demo --lines 1000 --probes 20
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_batch.py --settings 8:1,64:1,64:0,128:1,128:0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE = "Write one short sentence about the sea."


@contextlib.contextmanager
def serve(engine, workdir: Path, max_in_flight: int, priority: int, name: str, busy: int | None = None):
    import uvicorn

    from herd.platform.batch_config import BatchConfig
    from herd.platform.config import PlatformConfig
    from herd.platform.db import Database
    from herd.platform.service import Platform
    from herd.server import ServerOptions, create_app

    config = PlatformConfig(batch=BatchConfig(files_dir=str(workdir / "files"), max_in_flight=max_in_flight,
                                              priority=priority, busy_max_in_flight=busy or max_in_flight))
    platform = Platform(config, Database(f"sqlite:///{workdir / 'herd.db'}"))
    app = create_app(engine, ServerOptions(owns_engine=False, served_model_names=[name],
                                           max_pending_requests=4096), platform=platform)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def ttft(http: httpx.Client, name: str, max_tokens: int) -> float:
    body = {"model": name, "messages": [{"role": "user", "content": PROBE}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    start = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    return time.perf_counter() - start
    raise RuntimeError("the stream ended without content")


def probe(url: str, name: str, n: int, max_tokens: int) -> list[float]:
    with httpx.Client(base_url=url, timeout=300) as http:
        ttft(http, name, max_tokens)  # warm-up
        out = []
        for _ in range(n):
            out.append(ttft(http, name, max_tokens))
            time.sleep(0.05)
        return out


def batch_file(path: Path, name: str, lines: int, max_tokens: int) -> Path:
    with open(path, "w") as f:
        for i in range(lines):
            body = {"model": name, "messages": [{"role": "user", "content": f"Item {i}: describe a color."}],
                    "max_tokens": max_tokens, "temperature": 0}
            f.write(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
    return path


def run_setting(engine, workdir, name, args, max_in_flight, priority, busy, complete=False) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    with serve(engine, workdir, max_in_flight, priority, name, busy) as url:
        idle_ms = 1000 * statistics.median(probe(url, name, args.probes, args.probe_tokens))  # just before
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        f = c.files.create(file=batch_file(workdir / "in.jsonl", name, args.lines, args.batch_tokens).open("rb"),
                           purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        started = time.monotonic()
        while c.batches.retrieve(b.id).request_counts.completed < max(2, max_in_flight // 2):
            time.sleep(0.05)  # the engine is full of batch work before probing
        done0, t0 = c.batches.retrieve(b.id).request_counts.completed, time.monotonic()
        samples = probe(url, name, args.probes, args.probe_tokens)
        b1, t1 = c.batches.retrieve(b.id), time.monotonic()
        result = {
            "max_in_flight": max_in_flight, "priority": priority, "busy_max_in_flight": busy or max_in_flight,
            "idle_ttft_p50_ms": idle_ms,
            "ttft_p50_ms": 1000 * statistics.median(samples), "ttft_max_ms": 1000 * max(samples),
            "batch_lines_per_s": (b1.request_counts.completed - done0) / (t1 - t0),
        }
        if complete:
            while (b1 := c.batches.retrieve(b.id)).status not in ("completed", "failed"):
                time.sleep(0.5)
            elapsed = b1.completed_at - b1.in_progress_at if b1.completed_at else time.monotonic() - started
            result["whole_batch"] = {"lines": b1.request_counts.completed, "seconds": elapsed,
                                     "lines_per_s": b1.request_counts.completed / max(elapsed, 1e-9),
                                     "output_tokens_per_s": b1.usage.output_tokens / max(elapsed, 1e-9)}
        else:
            with contextlib.suppress(openai.ConflictError):  # it may have finished already
                c.batches.cancel(b.id)
            while c.batches.retrieve(b.id).status not in ("cancelled", "completed"):
                time.sleep(0.1)
        return result


def idle(engine, workdir, name, args) -> float:
    workdir.mkdir(parents=True, exist_ok=True)
    with serve(engine, workdir, 1, 1, name) as url:
        return 1000 * statistics.median(probe(url, name, args.probes, args.probe_tokens))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir or demo (default: the default model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--batch-tokens", type=int, default=32, help="max_tokens of each batch line")
    p.add_argument("--probes", type=int, default=15)
    p.add_argument("--probe-tokens", type=int, default=4)
    p.add_argument("--settings", default="8:1:2,8:1,4:1,64:1,128:1,128:0",
                   help="max_in_flight:priority[:busy_max_in_flight] (priority 0 = the same as interactive "
                        "requests; busy_max_in_flight defaults to max_in_flight here, i.e. no throttling)")
    p.add_argument("--complete", action="store_true", help="run the first setting's batch to the end")
    args = p.parse_args()

    from herd.engine.client import EngineClient

    engine = EngineClient.start(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    name = "bench"
    print(f"# model {engine.model_dir.name}, max_num_seqs {args.max_num_seqs}, {args.lines}-line batch, "
          f"{args.batch_tokens} tokens per line, {args.probes} probes; load: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        idle_before = idle(engine, tmp / "idle0", name, args)
        print(f"idle TTFT p50: {idle_before:.1f} ms", flush=True)
        rows = []
        for i, setting in enumerate(args.settings.split(",")):
            cap, prio, *busy = (int(x) for x in setting.split(":"))
            r = run_setting(engine, tmp / f"s{i}", name, args, cap, prio, busy[0] if busy else None,
                            complete=args.complete and i == 0)
            rows.append(r)
            print(json.dumps(r), flush=True)
        idle_after = idle(engine, tmp / "idle1", name, args)
    engine.shutdown()
    base = (idle_before + idle_after) / 2
    print(f"\nidle TTFT p50 {idle_before:.1f} ms before, {idle_after:.1f} ms after; load {os.getloadavg()}")
    print("| max_in_flight | busy_max_in_flight | priority | idle TTFT p50 (just before) | TTFT p50 with the batch |"
          " ratio | batch lines/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_in_flight']} | {r['busy_max_in_flight']} | {r['priority']} | {r['idle_ttft_p50_ms']:.1f} ms | "
              f"{r['ttft_p50_ms']:.1f} ms | "
              f"{r['ttft_p50_ms'] / r['idle_ttft_p50_ms']:.2f}x | {r['batch_lines_per_s']:.2f} |")
    print(f"(ratio against the mean idle figure of the whole run, {base:.1f} ms: "
          + ", ".join(f"{r['ttft_p50_ms'] / base:.2f}x" for r in rows) + ")")
    for r in rows:
        if "whole_batch" in r:
            w = r["whole_batch"]
            print(f"\nwhole batch (max_in_flight {r['max_in_flight']}): {w['lines']} lines in {w['seconds']:.1f} s, "
                  f"{w['lines_per_s']:.2f} lines/s, {w['output_tokens_per_s']:.1f} output tokens/s")


if __name__ == "__main__":
    main()
