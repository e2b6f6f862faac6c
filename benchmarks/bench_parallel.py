"""Tensor / expert parallelism: memory per rank at load, and what the communication costs.

    # CPU (gloo): per-rank peak memory at load for TP=1/2/4, and engine step time TP=1 vs TP=2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_parallel.py cpu

    # GPUs: Maverick-shaped layers (random weights, no checkpoint), one process per GPU:
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_parallel.py layers
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_parallel.py layers --expert-parallel
    # the same script on CPU with tiny shapes, to check it runs:
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_parallel.py layers --device cpu --tiny

`cpu` builds a random checkpoint (transformers' Llama 4, ~70M parameters, float32 on disk) once
in a temp dir. Peak memory of a rank = its VmHWM (the process's high-water resident set) once
loaded, minus the resident set of a process that has imported torch and herd but loaded nothing.
Step time = wall time of LLM.generate over a batch / engine steps, best of several runs.

`layers` times forward passes of N decoder layers (a dense and an MoE one, alternating, as in
Maverick) through the same sharded modules and collectives the engine uses, for a decode batch
and a prefill chunk, at the launched world size. Every rank prints nothing but rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_MODEL = dict(
    vocab_size=32000, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=2, attention_chunk_size=64, max_position_embeddings=4096,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def _vm(pid: int | str, field: str) -> int:
    """VmHWM / VmRSS of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _baseline() -> int:
    """RSS of an interpreter that imported what a rank imports, before any weight."""
    code = ("import herd.parallel.worker, herd.engine.engine, herd.checkpoint, pathlib;"
            "print(pathlib.Path('/proc/self/status').read_text())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ},
                         cwd=ROOT).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024


def _checkpoint(out: Path) -> Path:
    from tests.checkpoints import make_hf_model, save_checkpoint, text_config

    if not (out / "config.json").exists():
        save_checkpoint(make_hf_model(text_config(**CPU_MODEL)), out)
    return out


def _load_in_child(path: Path, size: int) -> dict:
    """Loads the model at TP=size in a fresh process (so rank 0's high-water mark is its own);
    returns every rank's peak RSS."""
    code = f"""
import json, os, pathlib, subprocess
from herd import LLM
llm = LLM({str(path)!r}, dtype="float32", device="cpu", kv_cache_tokens=256, tensor_parallel_size={size})
def vm(pid):
    fields = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{{pid}}/status").read_text().splitlines())
    return [int(fields[f].split()[0]) * 1024 for f in ("VmHWM", "RssAnon", "RssFile")]
kids = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
print("RESULT" + json.dumps([vm(os.getpid())] + [vm(k) for k in kids]))
llm.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT"):])


def _step_time(path: Path, size: int, batch: int, new_tokens: int, repeats: int) -> float:
    from herd import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (64,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    best = float("inf")
    with LLM(str(path), dtype="float32", device="cpu", tensor_parallel_size=size) as llm:
        _count_steps(llm)
        llm.generate(prompts[:2], params)  # warm-up
        for _ in range(repeats):
            steps_before = _steps(llm)
            start = time.perf_counter()
            llm.generate(prompts, params)
            best = min(best, (time.perf_counter() - start) / (_steps(llm) - steps_before))
    return best


def _count_steps(llm) -> None:
    runner = llm.engine.runner
    runner.steps_taken = 0
    execute = runner.execute

    def counted(batch):
        runner.steps_taken += 1
        return execute(batch)

    runner.execute = counted


def _steps(llm) -> int:
    return llm.engine.runner.steps_taken


def cmd_cpu(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="herd-bench-parallel-"))
    path = _checkpoint(work / "model")
    params_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    base, base_anon = _baseline()
    print(f"checkpoint: {params_bytes / 2**20:.1f} MiB float32; baseline RSS (imports) {base / 2**20:.1f} MiB")
    print(f"uptime: {os.getloadavg()}")
    print("| TP | rank | peak RSS (MiB) | peak above baseline (MiB) | / weights | anon after load, above baseline (MiB) "
          "| / weights | file-backed after load (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = 2**20
    for size in (1, 2, 4):
        for rank, (peak, anon, file) in enumerate(_load_in_child(path, size)):
            print(f"| {size} | {rank} | {peak / mib:.1f} | {(peak - base) / mib:.1f} | {(peak - base) / params_bytes:.2f} "
                  f"| {(anon - base_anon) / mib:.1f} | {(anon - base_anon) / params_bytes:.2f} | {file / mib:.1f} |")
    if args.skip_steps:
        return
    print(f"\nstep time, batch {args.batch} x {args.new_tokens} new tokens (64-token prompts), best of {args.repeats}:")
    print("| TP | ms per engine step | vs TP=1 |")
    print("|---:|---:|---:|")
    one = None
    for size in (1, 2):
        t = _step_time(path, size, args.batch, args.new_tokens, args.repeats)
        one = one or t
        print(f"| {size} | {t * 1000:.1f} | {t / one:.2f}x |")
    print(f"uptime: {os.getloadavg()}")


# -- layers (torchrun) -------------------------------------------------------------------------
MAVERICK = dict(
    hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_attention_heads=40,
    num_key_value_heads=8, head_dim=128, num_local_experts=128, num_experts_per_tok=1, vocab_size=202048,
)
TINY = dict(
    hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_attention_heads=8, num_key_value_heads=2,
    head_dim=8, num_local_experts=8, num_experts_per_tok=1, vocab_size=1024,
)


def cmd_layers(args) -> None:
    import torch.distributed as dist

    from herd.config import ModelConfig, TextConfig
    from herd.engine.kv_cache import KVCache
    from herd.model.attention import CHUNKED, GLOBAL, AttentionMetadata, GroupTables, SeqSlice
    from herd.parallel.comm import Group, Rank
    from herd.parallel.layers import ShardedLlama4TextModel
    from herd.parallel.sizes import Shard, check_size

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    shapes = TINY if args.tiny else MAVERICK
    layers = args.layers
    text = TextConfig(**shapes, num_hidden_layers=layers, moe_layers=list(range(1, layers, 2)),
                      no_rope_layers=[int((i + 1) % 4 != 0) for i in range(layers)], attention_chunk_size=8192,
                      max_position_embeddings=1 << 20, use_qk_norm=False)
    check_size(text, size, args.expert_parallel)
    group = Group(rank, size, device, None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = ShardedLlama4TextModel(text, Shard(rank, size, args.expert_parallel), group).to(dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    model.after_load()
    bs = 16
    tokens = max(args.prefill, args.decode_batch * args.context)
    blocks = tokens // bs + 2 * args.decode_batch + 8
    cache = KVCache(model.config, {GLOBAL: blocks, CHUNKED: blocks}, bs, dtype, device)

    def metadata(seq_lens: list[int], new: list[int]):
        positions, seqs, slots, tables, row, block = [], [], [], [], 0, 0
        for n, k in zip(seq_lens, new):
            nb = -(-n // bs)
            table = torch.arange(block, block + nb, device=device)
            block += nb
            pos = torch.arange(n - k, n, device=device)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table)
            seqs.append(SeqSlice(row, row + k, n))
            row += k
        groups = {gname: GroupTables(torch.cat(slots), tables) for gname in (GLOBAL, CHUNKED)}
        return AttentionMetadata(torch.cat(positions), seqs, groups, bs), row

    def timed(seq_lens, new) -> float:
        meta, rows = metadata(seq_lens, new)
        ids = torch.randint(0, text.vocab_size, (rows,), device=device)
        times = []
        for i in range(args.repeats + 1):
            meta.decode_plans.clear()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            with torch.inference_mode():
                hidden = model(ids, meta, cache.layers)
                model.compute_logits(hidden[-len(seq_lens):], upcast=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    decode = timed([args.context] * args.decode_batch, [1] * args.decode_batch)
    prefill = timed([args.prefill], [args.prefill])
    if rank == 0:
        mode = f"TP={size}" + (f"+EP={size}" if args.expert_parallel else "")
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"{mode} on {device.type} ({'tiny' if args.tiny else 'Maverick'} shapes, {layers} layers, "
              f"{weights / 2**30:.2f} GiB weights per rank, {dtype}): decode batch {args.decode_batch} at context "
              f"{args.context}: {decode * 1000:.2f} ms ({decode / layers * 1000:.3f} ms per layer); prefill "
              f"{args.prefill} tokens: {prefill * 1000:.2f} ms (median of {args.repeats})")
    group.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--work", default=None, help="directory for the checkpoint (kept between runs)")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--new-tokens", type=int, default=16)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--threads", type=int, default=1,
                   help="torch threads of rank 0 (workers get cores / N): 1 keeps TP=1 and TP=2 per-rank alike")
    c.add_argument("--skip-steps", action="store_true", help="memory only")
    l = sub.add_parser("layers")
    l.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    l.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run)")
    l.add_argument("--expert-parallel", action="store_true")
    l.add_argument("--layers", type=int, default=4)
    l.add_argument("--decode-batch", type=int, default=64)
    l.add_argument("--context", type=int, default=2048)
    l.add_argument("--prefill", type=int, default=2048)
    l.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    (cmd_cpu if args.cmd == "cpu" else cmd_layers)(args)


if __name__ == "__main__":
    main()
