"""herd convert-gguf: a dense Llama GGUF file -> a Llama 4 text checkpoint that herd runs.

The reference is transformers' own GGUF load (its config parsing, dequantization and q/k
un-permutation) into its Llama (rotate-half) model, in float32. transformers'
`from_pretrained(..., gguf_file=...)` insists on `accelerate` being installed only for its
device placement; `load_gguf_checkpoint` is the function it calls to read the tensors.
The real model is converted once per session (the default model, cached in the session's HERD_HOME).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from herd.gguf import GGUFError, add_arguments, convert_gguf, run  # noqa: E402
from tests.model_utils import herd_logits  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a land far away, there lived a small dragon who",
    "1, 2, 3, 5, 8, 13,",
]
TOL = 1e-4


def _transformers_gguf_model(path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm():
    """(converted dir, herd LLM, transformers' model of the GGUF file)."""
    from herd import LLM
    from herd.default_model import ensure_default_model, packaged_gguf

    try:
        source = packaged_gguf()
    except Exception as e:
        pytest.skip(str(e))
    model_dir = ensure_default_model(progress=False)
    return model_dir, LLM(model_dir, dtype="float32"), _transformers_gguf_model(source)


def test_config_is_a_dense_llama4_text_checkpoint(smollm):
    model_dir, _, _ = smollm
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"] and cfg["model_type"] == "llama4_text"
    assert cfg["moe_layers"] == [] and cfg["no_rope_layers"] == [1] * 30
    assert cfg["attention_chunk_size"] >= 8192 and cfg["max_position_embeddings"] == 8192
    assert not cfg["use_qk_norm"] and not cfg["attn_temperature_tuning"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        30,
        576,
        9,
        3,
    )
    assert (cfg["head_dim"], cfg["intermediate_size_mlp"], cfg["vocab_size"]) == (64, 1536, 49152)
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True and cfg["dtype"] == "float32"
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert 2 in gen["eos_token_id"] and 0 in gen["eos_token_id"]  # <|im_end|>, <|endoftext|>
    assert gen["do_sample"] is False and gen["max_new_tokens"] == 512
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_cfg["chat_template"]
    assert (model_dir / "chat_template.jinja").read_text() == tok_cfg["chat_template"]


def test_qk_rows_are_interleaved(smollm):
    """Row 2i / 2i+1 of each head = row i / i + head_dim/2 of transformers' rotate-half layout."""
    _, llm, ref = smollm
    for name, heads in (("q_proj", 9), ("k_proj", 3)):
        ours = getattr(llm.model.layers[3].self_attn, name).weight.view(heads, 32, 2, 576)
        theirs = getattr(ref.model.layers[3].self_attn, name).weight.view(heads, 2, 32, 576)
        assert torch.equal(ours[:, :, 0], theirs[:, 0]) and torch.equal(ours[:, :, 1], theirs[:, 1])
    # Everything else is copied unchanged.
    assert torch.equal(llm.model.layers[3].self_attn.v_proj.weight, ref.model.layers[3].self_attn.v_proj.weight)
    assert torch.equal(llm.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_logits_match_transformers_gguf_load(smollm):
    _, llm, ref = smollm
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        ours = herd_logits(llm.model, ids)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float()
        # Relative to the logits' scale: herd's CPU layers run through oneDNN-packed weights
        # (herd/model/cpu_linear.py), another float32 kernel whose rounding (~5e-6 relative) over
        # 30 layers reaches 1.2e-4 on logits of this model's size.
        diff = ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1.0)).item()
        assert diff < TOL, f"{prompt!r}: max |logit diff| / max |logit| {diff:.2e}"
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_generation_matches_transformers(smollm):
    """herd's greedy tokens (through the engine) are transformers' argmax at every step."""
    from herd import SamplingParams

    _, llm, ref = smollm
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for ids, out in zip(prompts, outputs):
        generated = out.outputs[0].token_ids
        assert len(generated) == 12
        with torch.no_grad():  # teacher forcing: one pass over prompt + herd's continuation
            logits = ref(torch.tensor([ids + generated[:-1]])).logits[0, len(ids) - 1 :]
        assert generated == logits.argmax(-1).tolist()


# --------------------------------------------------------------------- tiny GGUF files

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 2, 8, 64, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def write_tiny_gguf(path, arch="llama", weight_type="Q8_0", extra=None):
    """A random dense Llama GGUF: byte-level vocabulary, ChatML specials, Q8_0 matrices."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = SPECIALS + sorted(ByteLevel.alphabet()) + ["Ġt", "he"]
    merges = ["Ġ t", "h e"]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)

    def matrix(name, rows, cols):
        a = rng.standard_normal((rows, cols)).astype(np.float32) * 0.2
        if weight_type == "F32":
            w.add_tensor(name, a)
        elif weight_type == "TQ2_0":  # ternary: bytes only, the gguf package cannot quantize to it
            w.add_tensor(name, np.zeros((rows, cols // 256 * 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
        else:
            kind = gguf.GGMLQuantizationType[weight_type]
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)

    def norm(name):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), HIDDEN)
    norm("output_norm.weight")
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        matrix(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        matrix(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        matrix(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        matrix(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("weight_type", ["Q8_0", "F32"])
def test_cli_converts_a_tiny_gguf_and_herd_matches_transformers(tmp_path, weight_type, capsys):
    from herd import LLM

    source = write_tiny_gguf(tmp_path / "tiny.gguf", weight_type=weight_type)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(source), str(tmp_path / "out")])) == 0
    out = tmp_path / "out"
    assert capsys.readouterr().out.strip() == str(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    llm = LLM(out, dtype="float32")
    ref = _transformers_gguf_model(source)
    ids = llm.tokenizer.encode("the theme the thesis, 42!")
    ours = herd_logits(llm.model, ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-5
    # The chat template comes from the GGUF metadata.
    assert llm.tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_tiny_tokenizer_merges_and_specials(tmp_path):
    from herd.tokenizer import Tokenizer

    out = convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "out")
    tok = Tokenizer.from_dir(out)
    vocab = SPECIALS + sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he"]
    assert [vocab[i] for i in tok.encode(" the")] == ["Ġt", "he"]
    assert tok.encode("<|im_end|>") == [2] and tok.eos_token_ids == [0, 2]  # <|endoftext|>, <|im_end|>
    assert tok.decode(tok.encode("Grüße, 世界")) == "Grüße, 世界"


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    source = write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(GGUFError, match=r"unsupported GGUF architecture 'qwen2'.*dense Llama"):
        convert_gguf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_quantization_is_a_clear_error(tmp_path, capsys):
    source = write_tiny_gguf(tmp_path / "ternary.gguf", weight_type="TQ2_0")
    with pytest.raises(GGUFError, match=r"unsupported GGUF tensor type\(s\) TQ2_0 .*token_embd.weight.*Q4_1"):
        convert_gguf(source, tmp_path / "out")
    # Through the CLI: a one-line message and exit status 2, no traceback.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(source), str(tmp_path / "out")])) == 2
    assert "unsupported GGUF tensor type(s) TQ2_0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mixture_of_experts_llama_is_a_clear_error(tmp_path):
    source = write_tiny_gguf(tmp_path / "moe.gguf", extra={"llama.expert_count": 8})
    with pytest.raises(GGUFError, match="mixture-of-experts"):
        convert_gguf(source, tmp_path / "out")


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(GGUFError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
