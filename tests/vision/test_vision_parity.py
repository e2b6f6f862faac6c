"""The vision tower against transformers' Llama4ForConditionalGeneration on random-weight checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.checkpoint import CheckpointError, load_text_model
from herd.config import ConfigError, load_config, parse_config
from herd.engine.kv_cache import KVCache
from herd.model.attention import CHUNKED, GLOBAL, AttentionMetadata, GroupTables, SeqSlice
from herd.model.vision import VisionConfig, load_vision_model
from herd.multimodal import image_token_ids, preprocess
from tests.checkpoints import save_checkpoint, text_config
from tests.fixtures.make_vision_fixtures import synthetic_image

TOL = 1e-4
# 56 px tiles of 14 px patches: 16 patches -> 4 tokens per tile. head_dim 16 (a multiple of 4 for
# the 2D rotary embedding); intermediate_size = 4 x hidden and equal projector/vision output dims, as
# the adapter requires.
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=56,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=40,
    projector_output_dim=40,
    vision_output_dim=40,
    rope_theta=1000.0,
)
# Small ids for the image tokens (the checkpoint's vocabulary has 128 tokens).
SPECIALS = {
    "<|image_start|>": 100,
    "<|image_end|>": 101,
    "<|image|>": 102,
    "<|patch|>": 103,
    "<|tile_x_separator|>": 104,
    "<|tile_y_separator|>": 105,
}


class SmallVocab:
    def token_to_id(self, s):
        return SPECIALS.get(s)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(0)
    config = Llama4Config(
        text_config=text_config(num_hidden_layers=2),
        vision_config=dict(VISION),
        image_token_index=SPECIALS["<|patch|>"],
        boi_token_index=SPECIALS["<|image_start|>"],
        eoi_token_index=SPECIALS["<|image_end|>"],
    )
    hf = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init is tiny: make every vision weight matter
        for name, p in hf.named_parameters():
            if "vision_model" in name or "multi_modal_projector" in name:
                p.normal_(0, 0.5 if p.dim() == 1 else 0.2)
    out = save_checkpoint(hf, tmp_path_factory.mktemp("mm") / "ckpt", max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded: the loader walks the index
    return hf, out


@pytest.fixture(scope="module")
def encoder(checkpoint):
    _, path = checkpoint
    return load_vision_model(path, load_config(path), torch.float32, "cpu")


def hf_features(hf, pixels):
    with torch.no_grad():
        feats = hf.get_image_features(pixel_values=pixels).last_hidden_state
        return hf.multi_modal_projector(feats)


@pytest.mark.parametrize("tiles", [1, 5])
def test_projected_features_match(checkpoint, encoder, tiles):
    hf, _ = checkpoint
    torch.manual_seed(tiles)
    pixels = torch.randn(tiles, 3, 56, 56)
    with torch.no_grad():
        got = encoder(pixels)
    want = hf_features(hf, pixels)
    assert got.shape == (tiles, 4, 64) == want.shape
    assert (got - want).abs().max() <= TOL
    assert want.abs().max() > 1  # the comparison is not between near-zeros


def test_preprocessed_image_matches(checkpoint, encoder):
    hf, _ = checkpoint
    processed = preprocess(synthetic_image(150, 80, "RGB"), encoder.config)
    assert processed.grid == (2, 3) and processed.num_tiles == 7
    with torch.no_grad():
        got = encoder(processed.pixel_values)
    assert (got - hf_features(hf, processed.pixel_values)).abs().max() <= TOL


def test_config_fields(encoder):
    cfg = encoder.config
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.num_hidden_layers) == (56, 14, 32, 2)
    assert cfg.tokens_per_tile == 4 and cfg.text_hidden_size == 64 and cfg.rope_theta == 1000.0
    assert next(encoder.parameters()).dtype == torch.float32


@torch.inference_mode()
def herd_logits_from_embeds(model, embeds: torch.Tensor, block_size: int = 4) -> torch.Tensor:
    """tests/model_utils.herd_logits, with the input embeddings given."""
    n = embeds.shape[0]
    blocks = -(-n // block_size)
    cache = KVCache(model.config, {GLOBAL: blocks, CHUNKED: blocks}, block_size, embeds.dtype)
    table = torch.arange(blocks)
    meta = AttentionMetadata(
        positions=torch.arange(n),
        seqs=[SeqSlice(0, n, n)],
        groups={g: GroupTables(torch.arange(n), [table]) for g in (GLOBAL, CHUNKED)},
        block_size=block_size,
    )
    hidden = model(torch.zeros(n, dtype=torch.long), meta, cache.layers, inputs_embeds=embeds)
    return model.compute_logits(hidden)


@torch.no_grad()
def hf_multimodal_logits(hf, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Llama4ForConditionalGeneration.forward's own steps. transformers 5.24's forward computes the
    logits and then fails wrapping them (`MoeCausalLMOutputWithPast` has no `image_outputs`), with
    return_dict=False too; so its body is followed here: embed, project the image features,
    masked_scatter them over the image-token positions, run the language model."""
    try:
        return hf(input_ids=input_ids[None], pixel_values=pixels).logits[0].float()
    except AttributeError as e:
        if "image_outputs" not in str(e):
            raise
    embeds = hf.get_input_embeddings()(input_ids[None])
    features = hf.multi_modal_projector(hf.get_image_features(pixel_values=pixels).last_hidden_state)
    features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    mask = hf.get_placeholder_mask(input_ids[None], inputs_embeds=embeds, image_features=features)
    embeds = embeds.masked_scatter(mask, features)
    return hf.language_model(inputs_embeds=embeds).logits[0].float()


def test_full_multimodal_forward_matches(checkpoint, encoder):
    """Early fusion by hand: herd's features at the <|patch|> positions of herd's text model."""
    hf, path = checkpoint
    images = [preprocess(synthetic_image(w, h, "RGB", seed=w), encoder.config) for w, h in [(40, 40), (150, 60)]]
    ids = [1, 7, 8]
    for image in images:
        ids += image_token_ids(image.grid, encoder.config.tokens_per_tile, SmallVocab()) + [9, 10]
    ids += [11, 12]
    pixels = torch.cat([image.pixel_values for image in images])
    input_ids = torch.tensor(ids)

    want = hf_multimodal_logits(hf, input_ids, pixels)

    text = load_text_model(path, load_config(path), torch.float32)
    with torch.no_grad():
        embeds = text.embed_tokens(input_ids).clone()
        features = encoder(pixels).reshape(-1, encoder.config.text_hidden_size)
        patch = input_ids == SPECIALS["<|patch|>"]
        assert int(patch.sum()) == features.shape[0]
        embeds[patch] = features
    got = herd_logits_from_embeds(text, embeds)
    # The images matter: without them the logits after the first image are far off.
    unfused = herd_logits_from_embeds(text, text.embed_tokens(input_ids))
    first_patch = int(patch.nonzero()[0])
    assert (unfused[first_patch:] - want[first_patch:]).abs().max() > 100 * TOL
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_demo_checkpoint_loads(demo_dir):
    config = load_config(demo_dir)
    encoder = load_vision_model(demo_dir, config, torch.bfloat16, "cpu")
    cfg = encoder.config
    assert (cfg.image_size, cfg.patch_size, cfg.tokens_per_tile, cfg.text_hidden_size) == (336, 14, 144, 64)
    with torch.no_grad():
        out = encoder(torch.zeros(2, 3, 336, 336))
    assert out.shape == (2, 144, 64) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_published_vision_config():
    from pathlib import Path

    raw = json.loads((Path(__file__).resolve().parents[1] / "fixtures/configs/maverick_published.json").read_text())
    cfg = VisionConfig.from_model_config(parse_config(raw))
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.num_hidden_layers) == (336, 14, 1408, 34)
    assert (cfg.num_attention_heads, cfg.intermediate_size, cfg.rope_theta) == (16, 5632, 10000.0)
    assert (cfg.pixel_shuffle_ratio, cfg.projector_output_dim, cfg.text_hidden_size) == (0.5, 4096, 5120)
    assert cfg.tokens_per_tile == 144 and cfg.max_tiles == 16
    assert cfg.image_mean == cfg.image_std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(intermediate_size=100), "intermediate_size 100 must equal"),
        (dict(projector_output_dim=48), "projector_input_dim 40 must equal projector_output_dim 48"),
        (dict(vision_output_dim=48), "vision_output_dim 48 must equal"),
        (dict(image_size=50), "not a multiple of patch_size"),
        (dict(hidden_size=36, intermediate_size=144), "multiple of 4"),
        (dict(image_size=[56, 42]), "must be square"),
        (dict(hidden_act="relu"), "hidden_act"),
    ],
)
def test_inconsistent_vision_configs_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        VisionConfig.from_dict({**VISION, **change}, 64)


def test_preprocessor_config_read(tmp_path, checkpoint):
    _, path = checkpoint
    config = load_config(path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1], "max_patches": 9,
                    "size": {"height": 56, "width": 56}})
    )
    cfg = VisionConfig.from_model_config(config, tmp_path)
    assert cfg.image_mean == (0.1, 0.2, 0.3) and cfg.image_std == (0.3, 0.2, 0.1) and cfg.max_tiles == 9
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 336, "width": 336}}))
    with pytest.raises(ConfigError, match="does not match"):
        VisionConfig.from_model_config(config, tmp_path)


def test_text_only_checkpoint_refused(checkpoint):
    _, path = checkpoint
    config = load_config(path)
    config.vision = None
    with pytest.raises(ConfigError, match="no vision_config"):
        load_vision_model(path, config, torch.float32)


def _single_file_copy(src, dst):
    """The checkpoint as one unsharded file (easier to edit), with its config."""
    dst.mkdir()
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return tensors


def test_missing_tensor_named(tmp_path, checkpoint):
    _, path = checkpoint
    tensors = _single_file_copy(path, tmp_path / "c")
    del tensors["vision_model.model.layers.1.self_attn.q_proj.bias"]
    del tensors["multi_modal_projector.linear_1.weight"]
    save_file(tensors, tmp_path / "c" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 2 vision tensor\(s\): multi_modal_projector.linear_1.weight, "
                       r"vision_model.model.layers.1.self_attn.q_proj.bias"):
        load_vision_model(tmp_path / "c", load_config(tmp_path / "c"), torch.float32)


def test_misshaped_and_unexpected_tensors_named(tmp_path, checkpoint):
    _, path = checkpoint
    tensors = _single_file_copy(path, tmp_path / "c")
    tensors["vision_model.positional_embedding_vlm"] = torch.zeros(10, 32)
    save_file(tensors, tmp_path / "c" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"vision_model.positional_embedding_vlm has shape \[10, 32\], "
                       r"the vision config expects \[17, 32\]"):
        load_vision_model(tmp_path / "c", load_config(tmp_path / "c"), torch.float32)

    tensors = _single_file_copy(path, tmp_path / "d")
    tensors["vision_model.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "d" / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor vision_model.extra.weight"):
        load_vision_model(tmp_path / "d", load_config(tmp_path / "d"), torch.float32)


def test_prefixed_names_load(tmp_path, checkpoint):
    """transformers 5 may save the multimodal model's tensors under `model.`."""
    hf, path = checkpoint
    tensors = _single_file_copy(path, tmp_path / "c")
    tensors = {("model." + k if k.startswith(("vision_model.", "multi_modal_projector.")) else k): v
               for k, v in tensors.items()}
    save_file(tensors, tmp_path / "c" / "model.safetensors")
    encoder = load_vision_model(tmp_path / "c", load_config(tmp_path / "c"), torch.float32)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert (encoder(pixels) - hf_features(hf, pixels)).abs().max() <= TOL


def test_bad_pixel_shape(encoder):
    with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, 3, 56, 56\]"):
        encoder(torch.zeros(1, 3, 336, 336))
