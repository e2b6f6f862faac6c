"""herd's text decoder against transformers' Llama 4 on random-weight checkpoints (float32).

Each config exercises different architecture features; every test checks per-position logits
of a prompt spanning several attention chunks, then 64 greedy tokens through herd's engine
(prefill + paged decode) against one teacher-forced reference forward.
"""

import json

import pytest
import torch

from herd import LLM, SamplingParams
from tests.checkpoints import make_hf_model, save_checkpoint, text_config
from tests.model_utils import herd_logits

PROMPT_LEN = 70
GREEDY_TOKENS = 64
LOGIT_TOLERANCE = 1e-4

CONFIGS = {
    # Scout-like: every layer MoE, QK norm, GQA 4:1, llama3 scaling with equal high/low factors
    # (0/0 in the unused smoothing band), temperature tuning with a small floor_scale.
    "scout_like": dict(
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=16.0,
            low_freq_factor=1.0,
            high_freq_factor=1.0,
            original_max_position_embeddings=64,
        ),
        attn_temperature_tuning=True,
        floor_scale=4,
        attn_scale=0.5,
    ),
    # Maverick-like: MoE every other layer, no QK norm, top-2 routing, chunk of 8.
    "maverick_like": dict(
        interleave_moe_layer_step=2,
        use_qk_norm=False,
        num_experts_per_tok=2,
        attention_chunk_size=8,
        floor_scale=8,
    ),
    # Plain multi-head attention, explicit MoE layers, a NoPE layer every other layer.
    "mha_explicit_layers": dict(
        num_key_value_heads=4,
        moe_layers=[0, 3],
        no_rope_layer_interval=2,
        use_qk_norm=True,
        attn_temperature_tuning=False,
    ),
    # llama3 scaling with a real smoothing band, no chunking at all (every layer global).
    "llama3_smooth_global": dict(
        interleave_moe_layer_step=2,
        attention_chunk_size=None,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        floor_scale=16,
    ),
}


def _prompt(vocab: int, n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _check(hf, llm, prompt):
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    ours = herd_logits(llm.model, prompt)
    assert (ours - ref).abs().max().item() <= LOGIT_TOLERANCE

    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    out = llm.generate(prompt, params)[0].outputs[0]
    assert len(out.token_ids) == GREEDY_TOKENS
    with torch.no_grad():
        teacher = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0]
    assert teacher[len(prompt) - 1 :].argmax(-1).tolist() == out.token_ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_text_parity(tmp_path, name):
    hf = make_hf_model(text_config(**CONFIGS[name]))
    save_checkpoint(hf, tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", block_size=4)
    _check(hf, llm, _prompt(hf.config.vocab_size, PROMPT_LEN))


def test_multimodal_layout_and_published_spelling(tmp_path):
    """A Llama4ForConditionalGeneration checkpoint (language_model.* keys, vision weights present)
    whose config.json is rewritten in the published spelling: rope_theta + rope_scaling,
    torch_dtype, attn_temperature_tuning as an int, explicit moe_layers, no_rope_layers: []."""
    text = text_config(
        interleave_moe_layer_step=2,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=16.0,
            low_freq_factor=1.0,
            high_freq_factor=1.0,
            original_max_position_embeddings=32,
        ),
        floor_scale=8,
    )
    hf = make_hf_model(text, multimodal=True)
    save_checkpoint(hf, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    tc = cfg["text_config"]
    rope = tc.pop("rope_parameters")
    tc["rope_theta"] = rope.pop("rope_theta")
    tc["rope_scaling"] = rope
    tc["attn_temperature_tuning"] = 4
    tc["moe_layers"] = [1, 3]
    tc["no_rope_layers"] = []
    tc.pop("layer_types")
    cfg["torch_dtype"] = cfg.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    llm = LLM(str(tmp_path), dtype="float32", device="cpu", block_size=4)
    assert llm.config.is_multimodal
    _check(hf.language_model if hasattr(hf, "language_model") else hf, llm, _prompt(128, PROMPT_LEN, seed=2))
