"""The offline batch run behind `herd batch run` (arguments in herd/batch_cli.py): the engine in
this process, each line through the server's own chat/completions code (batch_lines.run_line),
so a line's body is what `herd serve` answers for it. No database, no ledger."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from herd.server.batch_lines import output_line, read_lines, run_line


def run_batch_file(args) -> int:
    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        print(f"herd batch run: {source} does not exist", file=sys.stderr)
        return 2
    lines, errors = read_lines(source, args.endpoint, models=None, max_lines=args.max_lines, any_endpoint=True)
    if errors:
        for e in errors:
            where = f"line {e['line']}: " if e["line"] else ""
            print(f"herd batch run: {where}{e['code']}: {e['message']}", file=sys.stderr)
        return 2
    from herd.engine.client import EngineClient
    from herd.server.state import ServerOptions, ServerState

    engine = EngineClient.start(  # the engine core in its own process, as under `herd serve`
        args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
    )
    # The lines' model name is whatever they call the one checkpoint this run loaded.
    named = next((ln.body["model"] for ln in lines if isinstance(ln.body.get("model"), str)), None)
    try:
        st = ServerState(engine, ServerOptions(served_model_names=[named] if named else []))
        results = asyncio.run(_run_all(st, lines, args.max_in_flight or 2 * args.max_num_seqs, not args.no_progress))
    finally:
        engine.shutdown()
    tmp = target.with_name(target.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps(result, ensure_ascii=False, separators=(",", ":")) + "\n")
    tmp.replace(target)
    failed = sum(1 for r in results if r["response"]["status_code"] != 200)
    print(f"herd batch run: {len(results) - failed} of {len(results)} lines succeeded; wrote {target}", file=sys.stderr)
    return 0  # failed lines are in the output, as their status codes say


async def _run_all(st, lines, max_in_flight: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(total=len(lines), unit="line", file=sys.stderr, disable=not progress)
    slots = asyncio.Semaphore(max_in_flight)
    results: list[dict | None] = [None] * len(lines)

    async def one(i, line):
        async with slots:
            status, body = await run_line(st, line.url, line.body, priority=0)
        results[i] = output_line(line.custom_id, status, body, f"{line.number}")
        bar.update(1)

    try:
        await asyncio.gather(*(one(i, line) for i, line in enumerate(lines)))
    finally:
        bar.close()
    return results
