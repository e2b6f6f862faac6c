"""One MoE layer (router, shared expert, routed experts top-k) against one dense GEMM of the same FLOPs.

CPU section (always): 128 experts top-1 plus the shared expert at shapes scaled for a CPU
(--hidden 256, --intermediate 512 by default), token counts 1, 8, 64, 512, in bfloat16 and
float32. For each: herd's MoE layer (grouped experts, herd/model/moe.py), the same layer with the
old per-expert Python loop (the "before", side by side in the same process), and a dense
[T, H] @ [H, N] GEMM with N chosen so that it does the same multiply-adds as the layer. Times are
medians over --reps calls; with one thread (the default) the CPU time of the calling thread is
reported beside the wall time: on a shared machine it is the steadier figure. "first call" is
the layer's time the first time it meets a new token count (fresh routing), the penalty real
traffic pays when shapes never repeat.

GPU section (when CUDA is available, or skipped): Maverick's shapes (hidden 5120, expert
intermediate 8192, 128 experts top-1 + shared), bf16 (torch._grouped_mm) and FP8
(torch._scaled_grouped_mm, row-wise scales), tokens 1 and 512, against the HBM-bandwidth bound
(bytes of the weights the step must read / --hbm-tbs) at 1 token and the tensor-core peak
(--peak-tflops, --peak-tflops-fp8) at 512.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_moe.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_moe.py --gpu-only   # on a GPU machine
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from herd.config import TextConfig, parse_text_config
from herd.model.llama4 import MoE
from herd.model.moe import route, swiglu_loop


def text_config(hidden: int, intermediate: int, experts: int, top_k: int) -> TextConfig:
    return parse_text_config(
        {
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "intermediate_size_mlp": 2 * intermediate,
            "num_local_experts": experts,
            "num_experts_per_tok": top_k,
            "num_hidden_layers": 2,
            "interleave_moe_layer_step": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "vocab_size": 1024,
        }
    )


def make_layer(cfg: TextConfig, dtype: torch.dtype, device: str = "cpu") -> MoE:
    g = torch.Generator(device=device).manual_seed(0)  # on the GPU: Maverick's experts are 32 GB
    with torch.device("meta"):
        layer = MoE(cfg)
    layer = layer.to_empty(device=device)
    for p in layer.parameters():
        fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]
        p.data = torch.randn(p.shape, generator=g, device=device, dtype=dtype) / fan_in**0.5
    return layer.eval()


def loop_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer as it ran before grouped experts: one Python iteration per expert."""
    logits = layer.router(x)
    top, ids = torch.topk(logits, layer.top_k, dim=-1)
    scores = torch.sigmoid(top.float()).to(x.dtype)
    experts = layer.experts
    rows, token_of, counts = route(x, ids, scores, experts.num_experts)
    y = swiglu_loop(rows, counts.tolist(), experts.gate_up_proj, experts.down_proj)
    return layer.shared_expert(x) + torch.zeros_like(x).index_add_(0, token_of, y)


def flops_per_token(cfg: TextConfig) -> int:
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    return 2 * h * e + 2 * 3 * h * i * (1 + k)  # router + shared expert + k routed experts


def timed(fn, reps: int) -> tuple[float, float]:
    """Median wall and calling-thread CPU seconds of fn() over reps calls (after one warm-up)."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    return statistics.median(wall), statistics.median(cpu)


@torch.inference_mode()
def cpu_section(args) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cfg = text_config(args.hidden, args.intermediate, args.experts, args.top_k)
    fpt = flops_per_token(cfg)
    n_dense = max(1, round(fpt / (2 * cfg.hidden_size)))
    print(
        f"CPU: {cfg.num_local_experts} experts top-{cfg.num_experts_per_tok} + shared, hidden {cfg.hidden_size}, "
        f"expert intermediate {cfg.intermediate_size}; dense GEMM [T, {cfg.hidden_size}] @ [{cfg.hidden_size}, {n_dense}] "
        f"(same FLOPs); {args.threads} thread(s); medians of {args.reps} calls; wall ms (CPU ms of the thread)"
    )
    print()
    print("| dtype | tokens | MoE layer, grouped | MoE layer, per-expert loop (before) | dense GEMM, same FLOPs "
          "| grouped / dense | loop / grouped | first call at a new token count (grouped / loop) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        layer = make_layer(cfg, dtype)
        w = torch.randn(n_dense, cfg.hidden_size).to(dtype) / cfg.hidden_size**0.5
        g = torch.Generator(device="cpu").manual_seed(1)
        for tokens in args.tokens:
            x = torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype)
            grouped = timed(lambda: layer(x), args.reps)
            loop = timed(lambda: loop_forward(layer, x), args.reps)
            dense = timed(lambda: F.linear(x, w), args.reps)
            # A token count met for the first time (odd, so no earlier call had it), fresh inputs.
            fresh = tokens + 3 + 2 * args.tokens.index(tokens)
            firsts = []
            for fn in (layer, lambda v: loop_forward(layer, v)):
                v = torch.randn(fresh, cfg.hidden_size, generator=g).to(dtype)
                t = time.perf_counter()
                fn(v)
                firsts.append(time.perf_counter() - t)
            fmt = lambda r: f"{1e3 * r[0]:.2f} ({1e3 * r[1]:.2f})"  # noqa: E731
            best = lambda r: r[1] if args.threads == 1 else r[0]  # noqa: E731
            print(
                f"| {str(dtype).removeprefix('torch.')} | {tokens} | {fmt(grouped)} | {fmt(loop)} | {fmt(dense)} "
                f"| {best(grouped) / best(dense):.2f} | {best(loop) / best(grouped):.2f} "
                f"| {1e3 * firsts[0]:.1f} / {1e3 * firsts[1]:.1f} ms ({fresh} tokens) |",
                flush=True,
            )


@torch.inference_mode()
def gpu_section(args) -> None:
    if not torch.cuda.is_available():
        print("\nGPU section: skipped (no CUDA device).")
        return
    from herd.model.quant import FP8_DTYPE, SCALED_MM, Fp8RoutedExperts, probe_grouped, quantize_rowwise
    from herd.model.moe import grouped_mm_works

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    cfg = text_config(5120, 8192, 128, 1)
    h, i = cfg.hidden_size, cfg.intermediate_size
    print(f"\nGPU: {name}; Maverick shapes (hidden {h}, expert intermediate {i}, 128 experts top-1 + shared)")
    print(f"torch._grouped_mm verified: {grouped_mm_works(dev)}; torch._scaled_grouped_mm verified: {probe_grouped(dev)}")
    print()
    print("| weights | tokens | MoE layer (ms) | bound (ms) | layer / bound | what bounds it |")
    print("|---|---:|---:|---:|---:|---|")
    layer = make_layer(cfg, torch.bfloat16, "cuda")
    fp8 = Fp8RoutedExperts(128, h, i, SCALED_MM).to(dev)
    fp8.grouped = probe_grouped(dev)
    for wq, ws, src in (
        (fp8.gate_up_weight, fp8.gate_up_scale, layer.experts.gate_up_proj.transpose(1, 2)),
        (fp8.down_weight, fp8.down_scale, layer.experts.down_proj.transpose(1, 2)),
    ):
        for e in range(src.shape[0]):  # one expert at a time: a whole-tensor float copy would not fit
            q, s = quantize_rowwise(src[e].float())
            wq.data[e].copy_(q.to(FP8_DTYPE))
            ws.data[e].copy_(s[:, 0])

    def moe_fp8(x):
        logits = layer.router(x)
        top, ids = torch.topk(logits, 1, dim=-1)
        return layer.shared_expert(x) + fp8(x, ids, torch.sigmoid(top.float()).to(x.dtype))

    def cuda_ms(fn, reps=args.reps):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    expert_bytes = 3 * h * i  # parameters of one expert (and of the shared expert)
    for label, fn, bytes_per_param, peak in (
        ("bf16", layer, 2, args.peak_tflops),
        ("fp8 experts (bf16 shared expert)", moe_fp8, 1, args.peak_tflops_fp8),
    ):
        for tokens in (1, 512):
            x = torch.randn(tokens, h, device=dev, dtype=torch.bfloat16)
            ms = cuda_ms(lambda: fn(x))
            if tokens == 1:
                # One routed expert + the shared expert (bf16) + the router must be read.
                moved = expert_bytes * bytes_per_param + expert_bytes * 2 + h * 128 * 2
                bound = moved / (args.hbm_tbs * 1e12) * 1e3
                why = f"HBM {args.hbm_tbs} TB/s"
            else:
                bound = tokens * flops_per_token(cfg) / (peak * 1e12) * 1e3
                why = f"tensor-core peak {peak} TFLOPS"
            print(f"| {label} | {tokens} | {ms:.3f} | {bound:.3f} | {ms / bound:.1f} | {why} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth, TB/s (H200 4.8, H100 SXM 3.35)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 tensor-core peak (H100/H200 SXM)")
    ap.add_argument("--peak-tflops-fp8", type=float, default=1979.0, help="dense FP8 tensor-core peak (H100/H200 SXM)")
    args = ap.parse_args()
    if not args.gpu_only:
        cpu_section(args)
    gpu_section(args)


if __name__ == "__main__":
    main()
