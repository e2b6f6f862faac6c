"""The tiny random-weight demo checkpoint: every Llama 4 feature, the real vocabulary, fast on a CPU.

It is written in exactly the public Hugging Face format (config.json with text and vision
configs, safetensors, tokenizer files, chat template, generation_config.json), so transformers
loads it too. Weights come from a fixed seed: the same files every time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "demo"
DEMO_SEED = 0

# Llama 4's real special ids (llama-models' tokenizer.model).
BOS_ID = 200000
EOS_IDS = [200001, 200007, 200008]  # <|end_of_text|>, <|eom|>, <|eot|>
PAD_ID = 200018

TEXT_CONFIG = {
    "vocab_size": 202048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "intermediate_size_mlp": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 8,
    "num_experts_per_tok": 1,
    # Maverick's pattern: odd layers MoE, every 4th layer NoPE (global attention).
    "interleave_moe_layer_step": 2,
    "no_rope_layer_interval": 4,
    "use_qk_norm": False,
    # A small chunk so that short prompts already cross chunk boundaries.
    "attention_chunk_size": 64,
    "attn_temperature_tuning": True,
    "floor_scale": 32,
    "attn_scale": 0.1,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_IDS,
    "pad_token_id": PAD_ID,
}

# Real tile geometry (336 px tiles of 14 px patches -> 144 tokens per tile), tiny widths.
VISION_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "image_size": 336,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 64,
    "projector_output_dim": 64,
    "vision_output_dim": 64,
}

MAX_CONTEXT = 8192
DEFAULT_MAX_TOKENS = 64


def herd_home() -> Path:
    return Path(os.environ.get("HERD_HOME", Path.home() / ".herd"))


def default_demo_dir() -> Path:
    return herd_home() / "models" / DEMO_NAME


def ensure_demo_model() -> Path:
    """The demo checkpoint in herd's cache directory, written on first use."""
    target = default_demo_dir()
    if not (target / "config.json").is_file():
        write_demo_model(target)
    return target


def write_demo_model(out_dir: str | Path) -> Path:
    """Writes the demo checkpoint atomically: a half-written directory is never left behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is ordinary data
    try:
        _write_weights_and_config(tmp)
        from herd.demo_tokenizer import write_llama4_tokenizer

        write_llama4_tokenizer(tmp)
        (tmp / "generation_config.json").write_text(
            json.dumps(
                {
                    "bos_token_id": BOS_ID,
                    "eos_token_id": EOS_IDS,
                    "pad_token_id": PAD_ID,
                    "do_sample": True,
                    "temperature": 0.6,
                    "top_p": 0.9,
                    # A random model rarely emits a stop token: cap what one request can cost.
                    "max_new_tokens": DEFAULT_MAX_TOKENS,
                },
                indent=2,
            )
            + "\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _write_weights_and_config(out_dir: Path) -> None:
    # transformers builds the full multimodal model (vision tower included) with its own
    # initialisation; imported here so that herd's runtime never needs it otherwise.
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    config = Llama4Config(
        text_config=dict(TEXT_CONFIG),
        vision_config=dict(VISION_CONFIG),
        boi_token_index=200080,
        eoi_token_index=200081,
        image_token_index=200092,
    )
    torch.manual_seed(DEMO_SEED)
    model = Llama4ForConditionalGeneration(config)
    # Cast parameters only: `model.to()` would also cast the vision tower's complex rotary
    # buffer to a real dtype (it is not saved, but the cast warns).
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.config.text_config.max_position_embeddings = MAX_CONTEXT
    model.save_pretrained(out_dir)
    # save_pretrained also writes a generation_config.json; ours replaces it.
