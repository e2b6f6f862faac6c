"""Structured outputs on the demo checkpoint (random weights, the real 202K Llama 4 vocabulary).

1. Correctness: 50 requests with 50 different schemas (nested objects, arrays with min/max items,
   enums, bounded integers and numbers, required and optional fields, patterns, maxLength,
   additionalProperties false) in one batch, non-streamed (LLM.generate) and streamed
   (EngineClient: the engine-core process, deltas joined): how many parse strictly (json.loads), validate (jsonschema) and
   end with finish_reason "stop".
2. Cost: N requests (default 64) of the same length, all free vs half constrained by a JSON schema
   that cannot finish within max_tokens (a long string: the widest masks): throughput ratio, plus
   grammar compile time and mask time per step.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_structured.py [--requests 64 --max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd import LLM  # noqa: E402
from herd.engine.client import EngineClient  # noqa: E402
from herd.engine.sampling import SamplingParams  # noqa: E402
from tests.structured.schemas import schema_variant  # noqa: E402

PROMPT = "Reply with one JSON object."


def _verdict(text: str, finish: str, schema: dict) -> str:
    if finish != "stop":
        return f"finish {finish}"
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError) as e:
        return type(e).__name__
    return "ok"


def correctness(llm: LLM, count: int, max_tokens: int) -> dict:
    schemas = [schema_variant(i) for i in range(count)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, structured_outputs={"json": s})
              for i, s in enumerate(schemas)]
    t = time.perf_counter()
    outs = llm.generate([PROMPT] * count, params)
    plain_s = time.perf_counter() - t
    plain = [_verdict(o.outputs[0].text, o.outputs[0].finish_reason, s) for o, s in zip(outs, schemas)]

    engine = EngineClient.start(llm.model_dir, max_num_seqs=llm.engine.options.max_num_seqs)

    async def one(i: int) -> str:
        text, finish = "", None
        ids = llm.tokenizer.encode(PROMPT, add_bos=True)
        async for out in engine.generate(ids, params[i], f"stream-{i}"):
            text += out.outputs[0].delta_text
            finish = out.outputs[0].finish_reason
        return _verdict(text, finish, schemas[i])

    async def all_streams():
        return await asyncio.gather(*(one(i) for i in range(count)))

    t = time.perf_counter()
    streamed = asyncio.run(all_streams())
    streamed_s = time.perf_counter() - t
    engine.shutdown()
    return {
        "requests": count,
        "non_streamed_ok": plain.count("ok"),
        "streamed_ok": streamed.count("ok"),
        "failures": sorted({v for v in plain + streamed if v != "ok"}),
        "non_streamed_s": round(plain_s, 1),
        "streamed_s": round(streamed_s, 1),
    }


def cost(llm: LLM, count: int, max_tokens: int, rounds: int) -> dict:
    long_string = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}
    free = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=1, ignore_eos=True)
    mixed = [free if i % 2 else SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i,
                                               structured_outputs={"json": {**long_string, "title": f"s{i}"}})
             for i in range(count)]
    prompts = [f"{PROMPT} Request {i}." for i in range(count)]
    grammars = llm.engine.grammars
    apply_times: list[float] = []
    original_apply = grammars.apply

    def timed_apply(logits, rows):
        t = time.perf_counter()
        original_apply(logits, rows)
        apply_times.append(time.perf_counter() - t)

    grammars.apply = timed_apply
    compile_times = []
    for i in range(5):  # cold compiles of distinct schemas, off the engine loop as requests see them
        spec = SamplingParams(structured_outputs={"json": schema_variant(1000 + i)}).structured_outputs
        t = time.perf_counter()
        grammars.start(spec)._compiled.result()
        compile_times.append(time.perf_counter() - t)
    best = {"free": float("inf"), "half constrained": float("inf")}
    for _ in range(rounds):  # interleaved rounds: the machine's noise hits both alike
        for name, params in (("free", free), ("half constrained", mixed)):
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - t
            assert sum(len(o.outputs[0].token_ids) for o in outs) == count * max_tokens
            best[name] = min(best[name], elapsed)
    grammars.apply = original_apply
    tokens = count * max_tokens
    return {
        "requests": count,
        "max_tokens": max_tokens,
        "free_tok_s": round(tokens / best["free"], 1),
        "half_constrained_tok_s": round(tokens / best["half constrained"], 1),
        "throughput_ratio": round(best["free"] / best["half constrained"], 3),
        "compile_ms_mean": round(statistics.mean(compile_times) * 1e3, 1),
        "mask_ms_per_step_mean": round(statistics.mean(apply_times) * 1e3, 2),
        "mask_ms_per_step_p90": round(sorted(apply_times)[int(0.9 * len(apply_times))] * 1e3, 2),
        "constrained_rows_per_step": count // 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--schemas", type=int, default=50)
    parser.add_argument("--schema-max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", choices=["correctness", "cost"])
    args = parser.parse_args()
    t = time.perf_counter()
    llm = LLM(args.model, max_num_seqs=max(64, args.requests))
    llm.engine.grammars.prepared()
    print(f"model load + vocabulary preparation: {time.perf_counter() - t:.1f} s", flush=True)
    results = {}
    if args.skip != "correctness":
        results["correctness"] = correctness(llm, args.schemas, args.schema_max_tokens)
        print(json.dumps(results["correctness"]), flush=True)
    if args.skip != "cost":
        results["cost"] = cost(llm, args.requests, args.max_tokens, args.rounds)
        print(json.dumps(results["cost"]), flush=True)
    print("JSON", json.dumps(results))


if __name__ == "__main__":
    main()
