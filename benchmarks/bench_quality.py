"""FP8 quality on a real model: perplexity of the default model (SmolLM2-135M-Instruct,
converted to Llama 4) on a fixed English text, with bf16 weights, FP8 weights, and an FP8 KV cache.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_quality.py [--text README.md]

Every variant scores the same tokens teacher-forced (prompt logprobs), so the perplexities
compare directly. SmolLM2 is dense: `fp8-all` quantizes every linear layer but the lm_head
(the routed-experts-only policy, `fp8`, would leave it untouched).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from herd import LLM, SamplingParams

VARIANTS = {
    "float32 weights, float32 KV": dict(dtype="float32"),
    "bf16 weights, bf16 KV": dict(dtype="bfloat16"),
    "FP8 weights (fp8-all), bf16 KV": dict(dtype="bfloat16", quantization="fp8-all"),
    "bf16 weights, FP8 KV": dict(dtype="bfloat16", kv_cache_dtype="fp8"),
    "FP8 weights, FP8 KV": dict(dtype="bfloat16", quantization="fp8-all", kv_cache_dtype="fp8"),
}


def perplexity(llm: LLM, ids: list[int]) -> float:
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    logprobs = [entry[token] for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(Path(__file__).resolve().parent.parent / "README.md"))
    parser.add_argument("--max-tokens", type=int, default=2048)
    args = parser.parse_args()
    text = Path(args.text).read_text()
    print(f"| variant | perplexity on {Path(args.text).name} |\n|---|---:|")
    ids = None
    for name, options in VARIANTS.items():
        llm = LLM(None, device="cpu", **options)
        if ids is None:
            ids = llm.tokenizer.encode(text, add_bos=llm.tokenizer.bos_token_id is not None)[: args.max_tokens]
        print(f"| {name} | {perplexity(llm, ids):.4f} |", flush=True)
    print(f"\n{len(ids)} tokens scored")


if __name__ == "__main__":
    main()
