"""The image-processor settings a checkpoint saved, in transformers 5's form (processor_config.json
with "image_processor" nested), transformers 4's (preprocessor_config.json), and both at once,
read with transformers' precedence and honoured: the prompt tokens are those of transformers'
Llama4Processor layout for the tile grids those settings give, and herd's prompt logprobs equal
transformers' Llama4ForConditionalGeneration on them.

transformers' image processor itself needs torchvision, which does not install beside the CPU
torch here; its settings are read with transformers' own reader (get_image_processor_dict) and
its tile choice is herd's best_grid, checked against it in tests/vision (fixtures made with it).
"""

import json

import pytest
import torch

from herd import LLM, SamplingParams
from herd.chat_prompt import ImageOptions, build_chat_prompt
from herd.config import ConfigError
from herd.multimodal import best_grid, image_token_count
from tests.engine.test_images import VISION, _message, _reference_logprobs, checkpoint  # noqa: F401

SAVED = {"image_processor_type": "Llama4ImageProcessorFast", "max_patches": 4, "image_mean": [0.4, 0.5, 0.6],
         "image_std": [0.3, 0.25, 0.2], "size": {"height": 56, "width": 56}, "resample": 2,
         "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True, "do_normalize": True,
         "resize_to_max_canvas": False}
OTHER = {**SAVED, "max_patches": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
FORMS = {
    "transformers5": {"processor_config.json": {"image_processor": SAVED, "processor_class": "Llama4Processor",
                                                "patch_size": 14, "pixel_shuffle_ratio": 0.5}},
    "transformers4": {"preprocessor_config.json": SAVED},
    # Both present: the nested settings win, as in transformers.
    "both": {"processor_config.json": {"image_processor": SAVED}, "preprocessor_config.json": OTHER},
}
SIZES = [(150, 60), (60, 110)]
PARAMS = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=0)


def _saved_as(checkpoint_dir, out, files):
    out.mkdir()
    for f in checkpoint_dir.iterdir():
        if f.name not in ("preprocessor_config.json", "processor_config.json"):
            (out / f.name).symlink_to(f)
    for name, content in files.items():
        (out / name).write_text(json.dumps(content))
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint[1]))


@pytest.fixture(scope="module")
def saved_dirs(checkpoint, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("saved")
    return {form: _saved_as(checkpoint[1], root / form, files) for form, files in FORMS.items()}


@pytest.fixture(scope="module")
def llm(saved_dirs):
    """One engine, on the transformers 5 form; the other forms' prompts are built from their own
    directories and run on it (the weights are the same)."""
    return LLM(str(saved_dirs["transformers5"]), dtype="float32", device="cpu", block_size=4)


def _processor_prompt_ids(tok, messages, grids, per_tile):
    """What Llama4Processor makes of the conversation: the chat template's text with each
    <|image|> replaced by _prompt_split_image(grid), tokenized as apply_chat_template does."""
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    hf_messages = [{**m, "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
                   for m in messages]
    text = tok.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    pieces = text.split("<|image|>")
    assert len(pieces) == len(grids) + 1
    text = pieces[0] + "".join(Llama4Processor._prompt_split_image(None, g, per_tile) + p
                               for g, p in zip(grids, pieces[1:]))
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("form", sorted(FORMS))
def test_saved_processor_settings_are_honoured(checkpoint, saved_dirs, llm, hf_tokenizer, form):  # noqa: F811
    from transformers.image_processing_base import ImageProcessingMixin

    hf = checkpoint[0]
    model_dir = saved_dirs[form]
    expected, _ = ImageProcessingMixin.get_image_processor_dict(str(model_dir))  # transformers' precedence
    assert expected["max_patches"] == 4

    messages = _message("Compare these.", *SIZES)
    per_tile = (VISION["image_size"] // 14) ** 2 // 4
    grids = [best_grid(w, h, VISION["image_size"], expected["max_patches"]) for w, h in SIZES]
    default_grids = [best_grid(w, h, VISION["image_size"], 16) for w, h in SIZES]
    # The saved max_patches changes the prompt: herd's defaults would give other token counts.
    assert sum(map(lambda g: image_token_count(g, per_tile), grids)) != sum(
        map(lambda g: image_token_count(g, per_tile), default_grids))

    chat = build_chat_prompt(llm.tokenizer, llm.config, messages, options=ImageOptions(), model_dir=model_dir)
    if form == "transformers5":  # LLM.chat reads its checkpoint's settings too
        result = llm.chat(messages, PARAMS)[0]
        assert result.prompt_token_ids == chat.prompt_ids
    else:
        result = llm._run([(chat.prompt_ids, PARAMS, None, chat.images)])[0]
    ids = result.prompt_token_ids
    assert ids == _processor_prompt_ids(hf_tokenizer, messages, grids, per_tile)
    assert [image.pixel_values.shape[0] for image in chat.images] == [r * c + (r * c > 1) for r, c in grids]
    # Normalised with the saved mean and std: a tile's corner pixel is the image's background.
    red = torch.tensor([200, 40, 40]) / 255
    mean, std = torch.tensor(expected["image_mean"]), torch.tensor(expected["image_std"])
    assert torch.allclose(chat.images[0].pixel_values[0, :, 0, 0], (red - mean) / std, atol=1e-6)

    pixels = torch.cat([image.pixel_values for image in chat.images])
    ref = _reference_logprobs(hf, ids, pixels)
    worst = max(abs(result.prompt_logprobs[i][ids[i]] - ref[i - 1, ids[i]].item()) for i in range(1, len(ids)))
    assert worst <= 1e-4


@pytest.mark.parametrize(
    "files, message",
    [
        ({"processor_config.json": {"image_processor": {**SAVED, "resize_to_max_canvas": True}}},
         r"processor_config.json \(image_processor\) asks for .*resize_to_max_canvas=true"),
        ({"preprocessor_config.json": {**SAVED, "resample": 3}}, "preprocessor_config.json asks for .*resample=3"),
        ({"preprocessor_config.json": {**SAVED, "do_normalize": False}}, "do_normalize=false"),
        ({"processor_config.json": {"image_processor": SAVED, "patch_size": 16}}, "patch_size 16 differs"),
        ({"processor_config.json": {"image_processor": SAVED, "image_token": "<img>"}}, "image_token '<img>'"),
        ({"processor_config.json": {"image_processor": {**SAVED, "image_processor_type": "CLIPImageProcessor"}}},
         "not Llama 4's"),
    ],
)
def test_settings_herd_cannot_honour_fail_at_load(checkpoint, tmp_path, files, message):  # noqa: F811
    model_dir = _saved_as(checkpoint[1], tmp_path / "m", files)
    for f in model_dir.glob("*.safetensors"):
        f.unlink()  # refused before any weight is read
    with pytest.raises(ConfigError, match=message):
        LLM(str(model_dir), dtype="float32", device="cpu")
