"""Grammar libraries side by side at the Llama 4 vocabulary (the demo checkpoint's tokenizer):
tokenizer preparation, compile of a nested schema, and bitmask fill per step along a valid
reply. Used once to choose herd's library (benchmarks/RESULTS.md); xgrammar is not a dependency:
    pip install --target /tmp/xgr --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
    HF_HUB_OFFLINE=1 python benchmarks/bench_grammar_libs.py --xgrammar-path /tmp/xgr
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
REPLY = {"name": "Ada Lovelace", "age": 36, "tags": ["a", "c"], "address": {"city": "London", "zip": "12345"}, "score": 0.5}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def xgrammar_tokenizer_info(tokenizer, vocab_size: int):
    import xgrammar as xgr

    encoded = [""] * vocab_size
    for token, i in tokenizer._tok.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and not tokenizer.is_special(i):  # control tokens never spell text
            encoded[i] = token
    return xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                             stop_token_ids=list(tokenizer.eos_token_ids))


def bench_xgrammar(tokenizer, vocab_size: int, reply_ids: list[int]) -> dict:
    import xgrammar as xgr

    info, prep = timed(lambda: xgrammar_tokenizer_info(tokenizer, vocab_size))
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    compiled, compile_s = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    _, cached_s = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    fills = []
    for t in reply_ids:
        _, dt = timed(lambda: matcher.fill_next_token_bitmask(bitmask, 0))
        fills.append(dt)
        assert matcher.accept_token(t), t
    logits = torch.randn(1, vocab_size)
    _, apply_s = timed(lambda: xgr.apply_token_bitmask_inplace(logits, bitmask))
    return {"prep_s": prep, "compile_ms": compile_s * 1e3, "cached_compile_ms": cached_s * 1e3,
            "fill_ms_mean": statistics.mean(fills) * 1e3, "fill_ms_max": max(fills) * 1e3, "apply_ms": apply_s * 1e3}


def bench_llguidance(tokenizer, vocab_size: int, reply_ids: list[int]) -> dict:
    import llguidance
    import llguidance.torch

    tok, prep = timed(lambda: llguidance.LLTokenizer(tokenizer.tokenizer_json, n_vocab=vocab_size,
                                                     eos_token=tokenizer.eos_token_ids))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    matcher, compile_s = timed(lambda: llguidance.LLMatcher(tok, grammar))
    assert not matcher.get_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    fills = []
    for t in reply_ids:
        _, dt = timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0))
        fills.append(dt)
        assert matcher.consume_token(t), t
    return {"prep_s": prep, "compile_ms": compile_s * 1e3, "fill_ms_mean": statistics.mean(fills) * 1e3,
            "fill_ms_max": max(fills) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--xgrammar-path", help="a folder where xgrammar is installed (pip --target --no-deps)")
    args = parser.parse_args()
    from herd.config import load_config
    from herd.demo import ensure_demo_model
    from herd.tokenizer import Tokenizer

    model_dir = ensure_demo_model()
    tokenizer = Tokenizer.from_dir(model_dir)
    vocab_size = load_config(model_dir).text.vocab_size
    reply_ids = tokenizer.encode(json.dumps(REPLY))  # the form herd enforces: ", " and ": "
    print(f"vocab {vocab_size}, reply of {len(reply_ids)} tokens")
    if args.xgrammar_path:
        sys.path.insert(0, args.xgrammar_path)
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            result = bench(tokenizer, vocab_size, reply_ids)
            print(name, json.dumps({k: round(v, 3) for k, v in result.items()}))
        except ImportError as e:
            print(name, "not measured:", e)


if __name__ == "__main__":
    main()
