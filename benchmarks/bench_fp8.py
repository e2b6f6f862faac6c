"""FP8 figures: GEMM / MoE-layer speed, accuracy against bf16, and memory.

    # GPU (H100/H200): FP8 vs bf16 GEMM and routed-MoE layer at Maverick's shapes, batch 1..256
    python benchmarks/bench_fp8.py speed
    # anywhere, a few seconds: the same code path at toy shapes (checks the script runs)
    python benchmarks/bench_fp8.py speed --device cpu --quick
    # demo checkpoint: teacher-forced top-1 agreement and mean KL of FP8 (and FP8 KV) vs bf16
    python benchmarks/bench_fp8.py accuracy
    # weight bytes bf16 vs FP8 (from shapes) for the demo and Maverick, peak RSS of load/serve
    python benchmarks/bench_fp8.py memory

Speed compares bf16 `F.linear` with herd's `fp8_linear` (per-token activation quantization
included) and herd's RoutedExperts with Fp8RoutedExperts (per-expert `_scaled_mm` loop and,
where it runs, `_scaled_grouped_mm`). On CPU the FP8 path is the dequant fallback, so CPU
timings say nothing about FP8 speed; they only prove the script works.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd.model.quant import (  # noqa: E402
    DEQUANT,
    SCALED_MM,
    Fp8RoutedExperts,
    fp8_backend,
    fp8_linear,
    probe_grouped,
    quantize_rowwise,
)

MAVERICK = dict(hidden=5120, experts=128, inter=8192)
QUICK = dict(hidden=256, experts=8, inter=512)


# -- speed ------------------------------------------------------------------------------------
def _time(fn, device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _fp8_weight(n: int, k: int, device, experts: int | None = None):
    """Random FP8 weight [.., n, k] + float32 row scales, quantized in slices (little memory)."""
    shape = (experts, n, k) if experts else (n, k)
    q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
    s = torch.empty(shape[:-1], dtype=torch.float32, device=device)
    for i in range(experts or 1):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        qi, si = quantize_rowwise(w)
        (q[i] if experts else q).copy_(qi)
        (s[i] if experts else s).copy_(si[:, 0])
    return q, s


def bench_speed(args) -> list[dict]:
    device = torch.device(args.device)
    shapes = QUICK if args.quick else MAVERICK
    batches = [1, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    iters = 3 if args.quick else 20
    dtype = torch.bfloat16
    backend = fp8_backend(device)
    h, e, inter = shapes["hidden"], shapes["experts"], shapes["inter"]
    rows = []
    print(f"# device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; FP8 path {backend}")

    # One expert's GEMMs (gate_up: [M, H] x [H, 2I]; down: [M, I] x [I, H]).
    for name, n, k in (("gate_up", 2 * inter, h), ("down", h, inter)):
        w_bf16 = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        q, s = quantize_rowwise(w_bf16)
        s = s[:, 0].float()
        for m in batches:
            x = torch.randn(m, k, device=device, dtype=dtype)
            t_bf16 = _time(lambda: F.linear(x, w_bf16), device, iters)
            t_fp8 = _time(lambda: fp8_linear(x, q, s, backend), device, iters)
            flops = 2 * m * n * k
            rows.append(dict(kind="gemm", op=name, M=m, N=n, K=k, bf16_ms=t_bf16, fp8_ms=t_fp8,
                             bf16_tflops=flops / t_bf16 / 1e9, fp8_tflops=flops / t_fp8 / 1e9))
            print(f"gemm {name:8s} M={m:4d} N={n} K={k}: bf16 {t_bf16:8.3f} ms  fp8 {t_fp8:8.3f} ms  x{t_bf16 / t_fp8:.2f}")
        del w_bf16, q, s

    # The routed-experts layer, top-1 routing over all experts (Maverick: 128 experts, top-1).
    from herd.model.llama4 import RoutedExperts

    with torch.device(device):
        fp8 = Fp8RoutedExperts(e, h, inter, backend)
    fp8.gate_up_weight.data, fp8.gate_up_scale.data = _fp8_weight(2 * inter, h, device, e)
    fp8.down_weight.data, fp8.down_scale.data = _fp8_weight(h, inter, device, e)
    grouped = backend == SCALED_MM and probe_grouped(device)
    variants = [("fp8_loop", False)] + ([("fp8_grouped", True)] if grouped else [])
    fp8_times = {}
    for m in batches:
        x = torch.randn(m, h, device=device, dtype=dtype)
        ids = torch.randint(0, e, (m, 1), device=device)
        scores = torch.rand(m, 1, device=device, dtype=dtype)
        for label, g in variants:
            fp8.grouped = g
            fp8_times[label, m] = _time(lambda: fp8(x, ids, scores), device, iters)
    del fp8
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # bf16 experts only now, so both never sit in memory at once (bf16 Maverick experts: 32 GB).
    with torch.device(device):
        bf16 = RoutedExperts(e, h, inter).to(dtype)
    for i in range(e):
        bf16.gate_up_proj.data[i].normal_(0, 0.02)
        bf16.down_proj.data[i].normal_(0, 0.02)
    for m in batches:
        x = torch.randn(m, h, device=device, dtype=dtype)
        ids = torch.randint(0, e, (m, 1), device=device)
        scores = torch.rand(m, 1, device=device, dtype=dtype)
        t_bf16 = _time(lambda: bf16(x, ids, scores), device, iters)
        row = dict(kind="moe", M=m, experts=e, hidden=h, inter=inter, bf16_ms=t_bf16)
        for label, _ in variants:
            row[f"{label}_ms"] = fp8_times[label, m]
        rows.append(row)
        extra = "  ".join(f"{label} {fp8_times[label, m]:8.3f} ms" for label, _ in variants)
        print(f"moe M={m:4d} E={e} H={h} I={inter}: bf16 {t_bf16:8.3f} ms  {extra}")
    return rows


# -- accuracy ---------------------------------------------------------------------------------
@torch.inference_mode()
def _logits(model, ids: list[int], kv_dtype: str = "auto") -> torch.Tensor:
    from herd.engine.kv_cache import KVCache
    from herd.model.attention import CHUNKED, GLOBAL, AttentionMetadata, GroupTables, SeqSlice

    n, bs = len(ids), 16
    blocks = -(-n // bs)
    cache = KVCache(model.config, {GLOBAL: blocks, CHUNKED: blocks}, bs, model.embed_tokens.weight.dtype, kv_dtype=kv_dtype)
    table = torch.arange(blocks)
    meta = AttentionMetadata(torch.arange(n), [SeqSlice(0, n, n)], {g: GroupTables(torch.arange(n), [table]) for g in (GLOBAL, CHUNKED)}, bs)
    return model.compute_logits(model(torch.tensor(ids), meta, cache.layers))


def bench_accuracy(args) -> list[dict]:
    from herd.checkpoint import load_text_model
    from herd.config import load_config
    from herd.demo import write_demo_model

    model_dir = Path(args.model) if args.model else write_demo_model(Path("/tmp/herd-bench-fp8-demo"))
    config = load_config(model_dir)
    dtype = torch.float32  # compute dtype: isolates the FP8 error from bf16 arithmetic
    torch.set_flush_denormal(True)
    base = load_text_model(model_dir, config, dtype)
    variants = {
        "fp8 (routed experts, Meta policy)": (load_text_model(model_dir, config, dtype, quantization="fp8"), "auto"),
        "fp8-all (every Linear but router/lm_head)": (load_text_model(model_dir, config, dtype, quantization="fp8-all"), "auto"),
        "fp8 KV cache (bf16 weights)": (base, "fp8"),
        "fp8 weights + fp8 KV cache": (load_text_model(model_dir, config, dtype, quantization="fp8"), "fp8"),
    }
    g = torch.Generator().manual_seed(0)
    vocab = config.text.vocab_size
    seqs = [torch.randint(0, vocab, (args.seq_len,), generator=g).tolist() for _ in range(args.num_seqs)]
    stats = {k: [0, 0.0, 0] for k in variants}  # agree, kl sum, positions
    for ids in seqs:
        ref = torch.log_softmax(_logits(base, ids), -1)
        for name, (model, kv) in variants.items():
            out = torch.log_softmax(_logits(model, ids, kv), -1)
            s = stats[name]
            s[0] += (out.argmax(-1) == ref.argmax(-1)).sum().item()
            s[1] += (ref.exp() * (ref - out)).sum(-1).sum().item()  # KL(bf16 || fp8)
            s[2] += len(ids)
    rows = []
    for name, (agree, kl, n) in stats.items():
        rows.append(dict(kind="accuracy", variant=name, positions=n, top1_agreement=agree / n, mean_kl=kl / n))
        print(f"{name:45s} positions {n}: top-1 agreement {agree / n:.4f}  mean KL {kl / n:.3e}")
    return rows


# -- memory -----------------------------------------------------------------------------------
def weight_bytes(text_cfg, quantization: str | None) -> tuple[int, int]:
    """(bytes, params) of the text model's weights in bf16 or with an FP8 policy, from shapes."""
    from herd.model.llama4 import Llama4TextModel
    from herd.model.quant import convert_to_fp8, policy_modules, resolve_policy

    with torch.device("meta"):
        model = Llama4TextModel(text_cfg).to(torch.bfloat16)
        if quantization:
            convert_to_fp8(model, policy_modules(model, resolve_policy(quantization)))
    params = list(model.parameters())
    return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params)


def _peak_rss_child(spec: str) -> None:
    """Child process: load (and serve a few requests) then print peak RSS in MiB."""
    opts = json.loads(spec)
    from herd import LLM, SamplingParams

    llm = LLM(opts["model"], dtype="bfloat16", device="cpu", **opts["kw"])
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    llm.generate(["Hello, who are you?"] * 4, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    serve_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kv = llm.engine.cache.nbytes() / 2**20
    print(json.dumps(dict(load_peak_mib=load_peak, serve_peak_mib=serve_peak, kv_cache_mib=kv)))


def bench_memory(args) -> list[dict]:
    from herd.config import load_config
    from herd.demo import write_demo_model

    demo = write_demo_model(Path("/tmp/herd-bench-fp8-demo")) if not args.model else Path(args.model)
    maverick = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs" / "maverick_published.json"
    rows = []
    for label, text in (("demo", load_config(demo).text), ("maverick", _config_from_json(maverick).text)):
        for q in (None, "fp8", "fp8-all"):
            b, n = weight_bytes(text, q)
            rows.append(dict(kind="weights", model=label, quantization=q or "bf16", params=n, bytes=b, gib=b / 2**30))
            print(f"weights {label:9s} {q or 'bf16':8s}: {n / 1e9:8.3f} B params  {b / 2**30:9.3f} GiB")
    for name, kw in (("bf16", {}), ("fp8", {"quantization": "fp8"}), ("fp8-all", {"quantization": "fp8-all"}),
                     ("fp8 + fp8 KV", {"quantization": "fp8", "kv_cache_dtype": "fp8"})):
        spec = json.dumps(dict(model=str(demo), kw=dict(kw, kv_cache_tokens=args.kv_tokens)))
        out = subprocess.run([sys.executable, __file__, "_rss", spec], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(dict(kind="peak_rss", variant=name, **r))
        print(f"demo {name:13s}: load peak {r['load_peak_mib']:7.1f} MiB  serve peak {r['serve_peak_mib']:7.1f} MiB  "
              f"KV cache {r['kv_cache_mib']:6.1f} MiB")
    return rows


def _config_from_json(path: Path):
    """A ModelConfig from a config.json file (load_config wants a directory)."""
    import tempfile

    from herd.config import load_config

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(path.read_text())
        return load_config(d)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_rss":
        _peak_rss_child(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "accuracy", "memory"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy shapes, two batch sizes (a smoke run)")
    p.add_argument("--model", default=None, help="checkpoint for accuracy/memory (default: the demo)")
    p.add_argument("--num-seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--kv-tokens", type=int, default=65536, help="KV cache size for the memory run")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = {"speed": bench_speed, "accuracy": bench_accuracy, "memory": bench_memory}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
