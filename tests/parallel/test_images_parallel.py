"""TP=2 with images: the vision tower is replicated on both ranks, its features replace the
<|patch|> embeddings of the vocabulary-parallel embedding; prompt logprobs (every position)
and greedy tokens equal TP=1's, with chunked prefill cutting through the images."""

import pytest

from herd import LLM, SamplingParams
from tests.engine.test_images import CASES, _message, checkpoint  # noqa: F401  (the module's checkpoint fixture)

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=0, logprobs=1)
OPTIONS = dict(dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=24)


def test_images_tp2_match_tp1(checkpoint):  # noqa: F811
    conversations = [_message("Describe.", *CASES[case]) for case in sorted(CASES)]
    conversations.append([{"role": "user", "content": "plain text " * 7}])
    want = LLM(str(checkpoint[1]), **OPTIONS).chat(conversations, PARAMS)
    with LLM(str(checkpoint[1]), tensor_parallel_size=2, **OPTIONS) as llm:
        assert llm.engine.runner.vision_model is not None
        got = llm.chat(conversations, PARAMS)
    for g, w in zip(got, want, strict=True):
        assert g.prompt_token_ids == w.prompt_token_ids
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], strict=True):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) <= 1e-4
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) <= 1e-4
