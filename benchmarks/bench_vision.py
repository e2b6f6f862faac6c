"""Vision cost: encode time per tile (Llama 4's real vision tower shape and the demo's), and
time to first token for chat requests with 1 and 5 images on the demo checkpoint.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_vision.py [--real-layers 34]

The real-shaped tower (hidden 1408, 34 layers, 336 px tiles) has random weights: speed does
not depend on the values. Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import time

import torch
from PIL import Image

from herd import LLM, SamplingParams
from herd.demo import write_demo_model
from herd.model.vision import Llama4VisionEncoder, VisionConfig


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def encode_per_tile(cfg: VisionConfig, tiles: int, dtype: torch.dtype, repeats: int) -> float:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama4VisionEncoder(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    pixels = torch.randn(tiles, 3, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        return _time(lambda: model(pixels), repeats) / tiles


def _image_part(width: int, height: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    array = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def ttft(llm: LLM, images: int, repeats: int) -> tuple[float, int]:
    parts = [{"type": "text", "text": "Describe the pictures."}]
    parts += [_image_part(640 + 37 * i, 480 - 29 * i, i) for i in range(images)]
    messages = [{"role": "user", "content": parts}]
    params = SamplingParams(max_tokens=1, temperature=0)
    tokens = len(llm.chat(messages, params)[0].prompt_token_ids)
    # Prefix caching would skip the images on repeats: every run gets a fresh engine cache.
    llm.engine.blocks.enable_prefix_caching = False
    return _time(lambda: llm.chat(messages, params), repeats), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real-layers", type=int, default=34, help="layers of the real-shaped tower")
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_flush_denormal(True)

    real = VisionConfig(num_hidden_layers=args.real_layers)  # the defaults are Llama 4's real tower
    print("| what | figure |\n|---|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        per_tile = encode_per_tile(real, args.tiles, dtype, args.repeats)
        print(f"| real-shaped tower ({args.real_layers} layers, {str(dtype)[6:]}), encode per 336 px tile | {per_tile * 1e3:.1f} ms |")

    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(write_demo_model(f"{tmp}/demo")), dtype="float32", device="cpu")
        demo_cfg = llm.engine.runner.vision_model.config
        per_tile = encode_per_tile(demo_cfg, args.tiles, torch.float32, args.repeats)
        print(f"| demo tower, encode per tile | {per_tile * 1e3:.2f} ms |")
        text_only, text_tokens = ttft(llm, 0, args.repeats)
        print(f"| demo, TTFT text only ({text_tokens} prompt tokens) | {text_only * 1e3:.0f} ms |")
        for n in (1, 5):
            seconds, tokens = ttft(llm, n, args.repeats)
            print(f"| demo, TTFT with {n} image(s) of ~640x480 ({tokens} prompt tokens) | {seconds * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
