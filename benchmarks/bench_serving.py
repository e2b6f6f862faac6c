"""Online serving benchmark in the style of vLLM's benchmark_serving.py.

Requests arrive as a Poisson process at each given rate (requests/s; `inf` sends all at once),
stream from /v1/completions, and the script reports TTFT, TPOT, inter-token latency (p50/p99)
and throughput. It only speaks the OpenAI HTTP API, so it measures `herd serve` and `vllm serve`
alike (same checkpoint, same prompts, same seed):

    herd serve --port 8000 &
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --rates 1 4 inf
    vllm serve /path/to/checkpoint --port 8001 &
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8001 --rates 1 4 inf

Prompts are random words from a fixed list (seeded), and every request generates exactly
--output-len tokens (`ignore_eos`), so both servers do the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

WORDS = (
    "the of and to in is that it for on as with was be by at this from or an are which but not have one "
    "all were when we there can more if out so what up about into than them some time could other then "
    "model token server request stream cache expert layer batch river mountain quiet yellow quickly"
).split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, output_len: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    result = Result(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(ok=False, error=f"{r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(ok=False, error=str(chunk["error"]))
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
        result.latency = time.perf_counter() - start
        result.ok = last is not None
        return result
    except httpx.HTTPError as e:
        return Result(ok=False, error=repr(e))


async def run_rate(base_url: str, model: str, prompts: list[str], output_len: int, rate: float, seed: int):
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(client, model, prompt, output_len)))
            if not math.isinf(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return results, duration


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(rate: float, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    ms = 1000.0
    return {
        "rate": rate,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "mean_ttft_ms": statistics.fmean(ttfts) * ms if ttfts else float("nan"),
        "p50_ttft_ms": percentile(ttfts, 50) * ms,
        "p99_ttft_ms": percentile(ttfts, 99) * ms,
        "p50_tpot_ms": percentile(tpots, 50) * ms,
        "p99_tpot_ms": percentile(tpots, 99) * ms,
        "p50_itl_ms": percentile(itls, 50) * ms,
        "p99_itl_ms": percentile(itls, 99) * ms,
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--model", default=None, help="model name (default: the server's first in /v1/models)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 4.0, float("inf")], help="requests/s; inf = burst")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and ignored) before measuring")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()

    model = args.model
    if model is None:
        data = httpx.get(f"{args.base_url}/v1/models", timeout=30).json()
        model = data["data"][0]["id"]
    prompts = make_prompts(args.num_prompts, args.input_len, args.seed)
    if args.warmup:
        asyncio.run(run_rate(args.base_url, model, prompts[: args.warmup], 8, float("inf"), args.seed))

    rows = []
    for rate in args.rates:
        results, duration = asyncio.run(run_rate(args.base_url, model, prompts, args.output_len, rate, args.seed))
        rows.append(summarize(rate, results, duration))

    print(f"model {model} at {args.base_url}: {args.num_prompts} prompts, ~{args.input_len} words in, "
          f"{args.output_len} tokens out")
    header = ("rate req/s", "done", "fail", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
              "ITL p50", "ITL p99")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [
            "inf" if math.isinf(r["rate"]) else f"{r['rate']:g}",
            str(r["completed"]),
            str(r["failed"]),
            f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}",
            *(f"{r[k]:.0f} ms" for k in ("p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms",
                                          "p99_itl_ms")),
        ]
        print("| " + " | ".join(cells) + " |")
        if r["errors"]:
            print(f"  errors: {r['errors']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "base_url": args.base_url, "args": vars(args), "results": rows}, f, indent=2,
                      default=str)


if __name__ == "__main__":
    main()
