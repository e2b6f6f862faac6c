"""KV-cache capacity planning: memory per token, and the longest context a budget admits.

Only global (NoPE) layers keep K/V for the whole context; a chunked (RoPE) layer needs at most
one chunk of it per sequence (plus the tokens of one scheduler step). So a long context costs
the global layers' bytes per token, plus a fixed chunk-sized amount per sequence.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
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
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="devices the model is split over: figures are per device (rank)")
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--gpu-memory", default=None,
                        help="memory of one device, e.g. 80GB (H100) or 141GB (H200): the KV budget is then "
                             "what is left of it after this rank's weights, instead of --kv-memory")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--activation-reserve", default="4GiB",
                        help="with --gpu-memory: room kept for activations and workspace per device")
    parser.add_argument("--quantization", default=None, choices=["fp8", "fp8-all"],
                        help="weights quantized as herd serve --quantization would (FP8 checkpoints: their own)")


def run(args) -> int:
    model = Path(args.model)
    if str(args.model) == "demo":
        from herd.demo import ensure_demo_model

        model = ensure_demo_model()
    # A checkpoint directory, or a config file on its own (no weights needed to plan).
    config = parse_config(json.loads(model.read_text())) if model.is_file() else load_config(model)
    cfg = config.text
    if args.tensor_parallel_size == 1 and args.gpu_memory is None:
        print(describe(cfg, parse_bytes(args.kv_memory), args.kv_cache_dtype, args.num_seqs, cfg.max_position_embeddings))
        return 0
    return _plan_devices(config, args)


def _plan_devices(config, args) -> int:
    """Per-rank figures: weights, KV bytes per token, longest context for a device's memory."""
    import torch

    from herd.parallel.memory import text_weight_bytes, vision_weight_bytes
    from herd.parallel.sizes import Shard, check_size

    cfg = config.text
    n = args.tensor_parallel_size
    try:
        check_size(cfg, n, args.enable_expert_parallel)
    except ValueError as e:
        print(f"herd plan: {e}", file=sys.stderr)
        return 2
    shard = Shard(0, n, args.enable_expert_parallel)
    local = shard.local_text_config(cfg)
    weights = text_weight_bytes(config, shard, torch.bfloat16, args.quantization)
    vision = vision_weight_bytes(config, torch.bfloat16)
    mode = "tensor + expert parallel" if args.enable_expert_parallel else "tensor parallel"
    print(f"{mode} over {n} device(s); figures per device (rank 0; others hold the same amounts)")
    print(f"heads {local.num_attention_heads} of {cfg.num_attention_heads}, KV heads {local.num_key_value_heads} "
          f"of {cfg.num_key_value_heads}" + (" (replicated)" if n > cfg.num_key_value_heads else "")
          + f", routed experts {len(shard.experts(cfg))} of {cfg.num_local_experts}"
          + ("" if args.enable_expert_parallel else f" (each {len(shard.expert_width(cfg))} of {cfg.intermediate_size} wide)"))
    print(f"weights: {_human(weights)} text + {_human(vision)} vision (replicated) = {_human(weights + vision)}")
    if args.gpu_memory is not None:
        device = parse_bytes(args.gpu_memory)
        budget = int(device * args.gpu_memory_utilization) - weights - vision - parse_bytes(args.activation_reserve)
        print(f"device {_human(device)} x {args.gpu_memory_utilization} - weights - {args.activation_reserve} "
              f"activations = KV budget {_human(max(budget, 0))}")
        if budget <= 0:
            print("the weights do not fit: use more devices, FP8, or a larger device")
            return 1
    else:
        budget = parse_bytes(args.kv_memory)
    print(describe(local, budget, args.kv_cache_dtype, args.num_seqs, cfg.max_position_embeddings))
    return 0
