"""Loading checkpoints as published: shards, key layouts, per-expert tensors, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.checkpoint import CheckpointError, load_text_model
from herd.config import load_config
from tests.checkpoints import make_hf_model, save_checkpoint, text_config
from tests.model_utils import herd_logits

PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(text_config(interleave_moe_layer_step=2, num_experts_per_tok=2))


def _load(path):
    return load_text_model(path, load_config(path), torch.float32)


def _assert_matches(hf, path):
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    assert (herd_logits(_load(path), PROMPT) - ref).abs().max().item() <= 1e-4


def test_sharded_checkpoint(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_matches(hf_model, tmp_path)


def _rewrite(path, change):
    """Applies change(tensors) -> tensors to a single-file checkpoint."""
    file = path / "model.safetensors"
    tensors = change(load_file(file))
    file.unlink()
    save_file(tensors, file, metadata={"format": "pt"})


def _per_expert(tensors):
    out = {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            inter = t.shape[2] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :, :inter].T.contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, :, inter:].T.contiguous()
        elif name.endswith("experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].T.contiguous()
        else:
            out[name] = t
    return out


def test_per_expert_layout(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path)
    _rewrite(tmp_path, _per_expert)
    _assert_matches(hf_model, tmp_path)


def test_both_key_layouts(tmp_path):
    """Llama4ForConditionalGeneration (language_model.model.*, with vision weights) and
    Llama4ForCausalLM (model.*) checkpoints of the same weights load to the same model."""
    mm = make_hf_model(text_config(interleave_moe_layer_step=2), multimodal=True)
    save_checkpoint(mm, tmp_path / "mm")
    keys = load_file(tmp_path / "mm" / "model.safetensors").keys()
    assert any(k.startswith("vision_model.") for k in keys)
    assert any(k.startswith("language_model.model.") for k in keys)
    text = make_hf_model(text_config(interleave_moe_layer_step=2))
    text.load_state_dict(mm.language_model.state_dict())
    save_checkpoint(text, tmp_path / "text")
    a = herd_logits(_load(tmp_path / "mm"), PROMPT)
    b = herd_logits(_load(tmp_path / "text"), PROMPT)
    assert torch.equal(a, b)


def test_missing_tensor_is_named(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path)
    _rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*layers\.1\.self_attn\.k_proj\.weight"):
        _load(tmp_path)


def test_missing_expert_is_named(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path)
    _rewrite(tmp_path, lambda t: {k: v for k, v in _per_expert(t).items() if ".experts.2.up_proj" not in k})
    with pytest.raises(CheckpointError, match=r"experts\.2\.up"):
        _load(tmp_path)


def test_extra_tensor_is_named(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path)
    _rewrite(tmp_path, lambda t: dict(t, **{"model.layers.0.self_attn.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.bogus\.weight"):
        _load(tmp_path)


def test_misshaped_tensor_is_named(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path)
    _rewrite(tmp_path, lambda t: dict(t, **{"model.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \[7\]"):
        _load(tmp_path)


def test_corrupt_file(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(tmp_path)
    file.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(tmp_path)


def test_index_naming_a_missing_shard(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim}"):
        _load(tmp_path)


def test_no_weights(tmp_path, hf_model):
    save_checkpoint(hf_model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        _load(tmp_path)
