"""Early fusion through the engine against transformers' Llama4ForConditionalGeneration.

A random-weight multimodal checkpoint with a tiny vision tower (56 px tiles: 4 tokens a tile);
prompts with one single-tile image, one multi-tile image, and three images of different aspect
ratios. herd's prompt logprobs (every prompt position) and greedy tokens are compared with the
reference given the same prompt ids and pixel tiles.
"""

import base64
import io

import pytest
import torch
from PIL import Image

from herd import LLM, SamplingParams
from herd.chat_prompt import ImageOptions, build_chat_prompt
from herd.demo_tokenizer import write_llama4_tokenizer
from tests.checkpoints import TINY_VISION, make_hf_model, text_config

VISION = dict(TINY_VISION, image_size=56)
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=0)


def _data_url(width, height, color):
    image = Image.new("RGB", (width, height), color)
    image.paste((255 - color[0], color[1] // 2, 30), (width // 4, height // 4, width // 2, height // 2))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _message(text, *sizes):
    parts = [{"type": "text", "text": text}]
    colors = [(200, 40, 40), (30, 160, 90), (20, 60, 220)]
    for (w, h), color in zip(sizes, colors):
        parts.append({"type": "image_url", "image_url": {"url": _data_url(w, h, color)}})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = text_config(vocab_size=202048, interleave_moe_layer_step=2, attention_chunk_size=32, hidden_size=32,
                       num_attention_heads=4, head_dim=8, intermediate_size=16, intermediate_size_mlp=48)
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=VISION)).eval()
    out = tmp_path_factory.mktemp("mm")
    hf.save_pretrained(out)
    write_llama4_tokenizer(out)
    return hf, out


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4)


def _reference_logprobs(hf, prompt_ids, pixel_values):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        features = hf.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        projected = hf.multi_modal_projector(features.reshape(-1, features.shape[-1]))
        mask = (ids == hf.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, projected)
        logits = hf.language_model(inputs_embeds=embeds).logits[0]
    return torch.log_softmax(logits.float(), -1)


CASES = {
    "one_tile": [(50, 50)],
    "multi_tile": [(150, 60)],
    "three_images": [(60, 110), (120, 120), (200, 40)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_image_prompts_match_transformers(checkpoint, llm, case):
    hf = checkpoint[0]
    messages = _message("Describe these.", *CASES[case])
    chat = build_chat_prompt(llm.tokenizer, llm.config, messages, options=ImageOptions())
    assert len(chat.images) == len(CASES[case])
    if case == "multi_tile":
        assert chat.images[0].pixel_values.shape[0] > 1  # tiles + global thumbnail
    result = llm.chat(messages, PARAMS)[0]
    assert result.prompt_token_ids == chat.prompt_ids
    pixels = torch.cat([image.pixel_values for image in chat.images])
    ref = _reference_logprobs(hf, chat.prompt_ids, pixels)
    ours = result.prompt_logprobs
    for i in range(1, len(chat.prompt_ids)):
        assert abs(ours[i][chat.prompt_ids[i]] - ref[i - 1, chat.prompt_ids[i]].item()) <= 1e-4
    tokens = result.outputs[0].token_ids
    full = _reference_logprobs(hf, chat.prompt_ids + tokens[:-1], pixels)
    assert full[len(chat.prompt_ids) - 1 :].argmax(-1).tolist() == tokens


def test_chunked_prefill_across_images_and_mixed_batches(checkpoint, llm):
    messages = _message("Compare.", *CASES["three_images"])
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = llm.chat(messages, greedy)[0].outputs[0].token_ids
    chunked = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=8)
    assert chunked.chat(messages, greedy)[0].outputs[0].token_ids == alone
    texts = [[{"role": "user", "content": "plain text " * k}] for k in (1, 5, 9)]
    text_alone = [llm.chat(t, greedy)[0].outputs[0].token_ids for t in texts]
    mixed = llm.chat([texts[0], messages, texts[1], texts[2]], greedy)
    assert [m.outputs[0].token_ids for m in mixed] == [text_alone[0], alone, text_alone[1], text_alone[2]]


def test_prefix_cache_tells_images_apart(checkpoint, llm):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    red = _message("What colour?", (50, 50))
    blue = [{"role": "user", "content": [red[0]["content"][0],
                                         {"type": "image_url", "image_url": {"url": _data_url(50, 50, (0, 0, 255))}}]}]
    fresh = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4, enable_prefix_caching=False)
    first = llm.chat(red, greedy)[0]
    again = llm.chat(red, greedy)[0]
    other = llm.chat(blue, greedy)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    # The blue image shares every token id with the red one; only its pixels differ.
    assert other.prompt_token_ids == first.prompt_token_ids
    assert other.outputs[0].token_ids == fresh.chat(blue, greedy)[0].outputs[0].token_ids
    image_start = other.prompt_token_ids.index(200080)
    assert other.num_cached_tokens <= image_start


def test_too_many_images_and_bad_images(llm):
    with pytest.raises(ValueError, match="at most 5 images"):
        llm.chat(_message("x", *[(30, 30)] * 3) + _message("y", *[(30, 30)] * 3), SamplingParams(max_tokens=2))
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(ValueError):
        llm.chat(bad, SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()
