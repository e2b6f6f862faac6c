"""Builds small random-weight Llama 4 checkpoints with transformers, for parity and loader tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A small base config; tests override what they exercise.
BASE_TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    attention_chunk_size=16,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    # Larger than the default 0.02 so that logits are far from uniform and errors show.
    initializer_range=0.1,
)

TINY_VISION = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=28,
    patch_size=14,
    vision_output_dim=32,
    projector_input_dim=32,
    projector_output_dim=32,
)


def text_config(**overrides) -> dict:
    cfg = dict(BASE_TEXT)
    cfg.update(overrides)
    return cfg


def make_hf_model(text: dict, *, multimodal: bool = False, seed: int = 0):
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    torch.manual_seed(seed)
    if multimodal:
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=TINY_VISION))
    else:
        model = Llama4ForCausalLM(Llama4TextConfig(**text))
    return model.eval()


def write_word_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer ("t0 t1 ...") so that small-vocabulary checkpoints load in herd."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t1", "eos_token": "t2"}))


def save_checkpoint(model, out_dir: Path, *, max_shard_size: str | None = None) -> Path:
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    text_cfg = model.config.get_text_config()
    write_word_tokenizer(out_dir, text_cfg.vocab_size)
    return out_dir
