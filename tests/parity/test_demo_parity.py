"""End to end on the demo checkpoint (real vocabulary, chat template) against transformers."""

import torch

from herd import LLM, SamplingParams
from tests.model_utils import herd_logits


def test_demo_checkpoint_matches_transformers(demo_dir):
    from transformers import Llama4ForConditionalGeneration

    # The text decoder alone: the multimodal wrapper's text-only forward is broken in transformers 5.24.
    hf = Llama4ForConditionalGeneration.from_pretrained(demo_dir, dtype=torch.float32).eval().language_model
    llm = LLM(str(demo_dir), dtype="float32", device="cpu")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about mixture-of-experts models. " * 6},
    ]
    prompt = llm.tokenizer.apply_chat_template(messages)
    assert prompt[0] == 200000 and len(prompt) > 64  # crosses the demo's 64-token chunk

    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([prompt])).logits[0].float()
    assert (herd_logits(llm.model, prompt) - ref).abs().max().item() <= 1e-4

    out = llm.chat(messages, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 32
    with torch.no_grad():
        teacher = hf(input_ids=torch.tensor([prompt + out.token_ids[:-1]])).logits[0]
    assert teacher[len(prompt) - 1 :].argmax(-1).tolist() == out.token_ids
    assert out.text == llm.tokenizer.decode(out.token_ids)
