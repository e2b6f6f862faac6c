"""KV-cache capacity planning: memory per token, and the longest context a budget admits.

Only global (NoPE) layers keep K/V for the whole context; a chunked (RoPE) layer needs at most
one chunk of it per sequence (plus the tokens of one scheduler step). So a long context costs
the global layers' bytes per token, plus a fixed chunk-sized amount per sequence.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from herd.config import TextConfig, load_config, parse_config

KV_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'40GiB' -> 42949672960; '1.5 GB' -> 1500000000."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size (e.g. 40GiB, 512MiB, 2GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass
class KVPlan:
    global_layers: int
    chunked_layers: int
    bytes_per_token_global: int  # grows with the context
    bytes_per_token_chunked: int  # per token of the current chunk only
    chunk_size: int | None
    per_sequence_fixed: int  # chunked layers' worst case for one sequence

    @property
    def bytes_per_token_all_layers(self) -> int:
        """What a cache without chunk release would need per token."""
        return self.bytes_per_token_global + self.bytes_per_token_chunked

    def max_context(self, budget: int, num_seqs: int = 1) -> int:
        """Longest context each of `num_seqs` sequences can reach within `budget` bytes."""
        if self.chunk_size is None or self.global_layers == 0:
            per_token = self.bytes_per_token_all_layers
            return max(0, budget // num_seqs // per_token)
        room = budget - num_seqs * self.per_sequence_fixed
        return max(0, room // num_seqs // self.bytes_per_token_global)


def kv_plan(cfg: TextConfig, kv_dtype: str = "bfloat16", step_tokens: int = 2048) -> KVPlan:
    per_layer = cfg.num_key_value_heads * cfg.head_dim * 2 * KV_DTYPE_BYTES[kv_dtype]
    chunked = sum(cfg.is_chunked(i) for i in range(cfg.num_hidden_layers))
    global_layers = cfg.num_hidden_layers - chunked
    chunk = cfg.attention_chunk_size
    fixed = chunked * per_layer * (chunk + step_tokens) if chunk is not None else 0
    return KVPlan(global_layers, chunked, global_layers * per_layer, chunked * per_layer, chunk, fixed)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def describe(cfg: TextConfig, budget: int, kv_dtype: str, num_seqs: int, max_model_len: int | None) -> str:
    plan = kv_plan(cfg, kv_dtype)
    longest = plan.max_context(budget, num_seqs)
    lines = [
        f"layers: {plan.global_layers} global (whole context), {plan.chunked_layers} chunked "
        f"(chunk {plan.chunk_size} tokens)",
        f"KV per token ({kv_dtype}): {_human(plan.bytes_per_token_global)} in global layers; "
        f"{_human(plan.bytes_per_token_all_layers)} if every layer kept the whole context",
        f"chunked layers, per sequence: at most {_human(plan.per_sequence_fixed)}",
        f"KV budget {_human(budget)}, {num_seqs} sequence(s): longest context {longest:,} tokens"
        + (f" (the model allows {max_model_len:,})" if max_model_len else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd plan", description="KV-cache memory per token and longest context")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory (or its config.json), or 'demo'")
    parser.add_argument("--kv-memory", default="40GiB", help="KV-cache budget, e.g. 40GiB")
    parser.add_argument("--kv-cache-dtype", default="bfloat16", choices=sorted(KV_DTYPE_BYTES))
    parser.add_argument("--num-seqs", type=int, default=1, help="sequences sharing the budget")


def run(args) -> int:
    model = Path(args.model)
    if str(args.model) == "demo":
        from herd.demo import ensure_demo_model

        model = ensure_demo_model()
    # A checkpoint directory, or a config file on its own (no weights needed to plan).
    cfg = parse_config(json.loads(model.read_text())).text if model.is_file() else load_config(model).text
    print(describe(cfg, parse_bytes(args.kv_memory), args.kv_cache_dtype, args.num_seqs, cfg.max_position_embeddings))
    return 0
