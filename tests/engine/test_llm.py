"""The offline API on the demo checkpoint: batching, chunked prefill, preemption, sampling."""

import math

import pytest

from herd import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [
    "The quick brown fox",
    "Mixture-of-experts models route each token " * 12,  # crosses the 64-token chunk
    "1 2 3 4 5",
    "Bonjour, comment ça va ? 日本語のテキスト 🙂",
]


@pytest.fixture(scope="module")
def llm(demo_dir):
    return LLM(str(demo_dir), dtype="float32", device="cpu")


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_equals_one_at_a_time(llm):
    alone = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == alone


def test_chunked_prefill_and_preemption_keep_outputs(demo_dir, llm):
    expected = _tokens(llm.generate(PROMPTS, GREEDY))
    chunked = LLM(str(demo_dir), dtype="float32", device="cpu", max_num_batched_tokens=16)
    assert _tokens(chunked.generate(PROMPTS, GREEDY)) == expected
    # A cache too small for all four at once: the newest requests are preempted and recomputed.
    small = LLM(str(demo_dir), dtype="float32", device="cpu", kv_cache_tokens=160, block_size=16)
    assert _tokens(small.generate(PROMPTS, GREEDY)) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.blocks.num_free() == {g: p.num_blocks for g, p in small.engine.cache.pools.items()
                                               if g in small.engine.cache.group_names}


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    assert llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids == alone
    assert llm.generate(PROMPTS, params)[0].outputs[0].token_ids == alone
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True)
    assert llm.generate(PROMPTS[0], other)[0].outputs[0].token_ids != alone


def test_top_k_one_is_greedy(llm):
    sampled = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=5.0, top_k=1, ignore_eos=True))
    greedy = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert _tokens(sampled) == _tokens(greedy)


def test_logprobs(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=4))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, top in zip(out.token_ids, out.logprobs):
        assert token in top
        assert 4 <= len(top) <= 5
        assert all(lp <= 0 for lp in top.values())
        assert sum(math.exp(lp) for lp in top.values()) <= 1.0 + 1e-5
    greedy = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logprobs=1))[0].outputs[0]
    for token, top in zip(greedy.token_ids, greedy.logprobs):
        assert max(top, key=top.get) == token  # greedy picks the most likely token


def test_stop_string_and_length(llm):
    full = llm.generate(PROMPTS[2], GREEDY)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == GREEDY.max_tokens
    stop = full.text[5:9]
    assert stop.strip()
    stopped = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))
    out = stopped[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.find(stop)]


def test_stop_token_ids(llm):
    full = llm.generate(PROMPTS[2], GREEDY)[0].outputs[0]
    target = full.token_ids[3]
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[target]))
    first = full.token_ids.index(target)
    assert out[0].outputs[0].token_ids == full.token_ids[: first + 1]
    assert out[0].outputs[0].finish_reason == "stop"


def test_token_id_prompts_and_chat(llm):
    ids = llm.tokenizer.encode("hello world", add_bos=True)
    a = llm.generate(ids, GREEDY)[0]
    b = llm.generate("hello world", GREEDY)[0]
    assert a.prompt_token_ids == b.prompt_token_ids and _tokens([a]) == _tokens([b])
    chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY)[0]
    assert chat.prompt_token_ids[-4:] == llm.tokenizer.encode("<|header_start|>assistant<|header_end|>\n\n")


def test_bad_requests_are_refused(llm):
    with pytest.raises(ValueError, match="context"):
        llm.generate([5] * 9000, GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([300000], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    # The engine is still healthy and holds no blocks afterwards.
    assert llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].token_ids
    assert not llm.engine.has_unfinished()


def test_long_context_keeps_only_global_layers_growing(demo_dir):
    """A sequence many chunks long: chunked layers hold one chunk (plus a step) of blocks;
    only the global layers' blocks grow with the context."""
    llm = LLM(str(demo_dir), dtype="float32", device="cpu", max_num_batched_tokens=128, block_size=16)
    engine = llm.engine
    chunk = llm.config.text.attention_chunk_size
    prompt = [(i * 7919) % 150000 + 1000 for i in range(20 * chunk)]  # 1,280 tokens: 20 chunks
    engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    peak = {"global": 0, "chunked": 0}
    while engine.has_unfinished():
        engine.step()
        for group, pool in engine.cache.pools.items():
            peak[group] = max(peak[group], pool.num_used)
    assert peak["global"] == -(-(len(prompt) + 8) // 16)
    assert peak["chunked"] <= (chunk + 128) // 16 + 1
    assert all(p.num_free == p.num_blocks for p in engine.cache.pools.values())


def test_min_tokens_and_include_stop_str(llm):
    eos = sorted(llm.engine.eos_ids)[0]
    # A huge bias makes the end-of-turn token the greedy choice at every step...
    forced = SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100.0})
    assert llm.generate(PROMPTS[0], forced)[0].outputs[0].token_ids == [eos]
    # ...but min_tokens keeps stop tokens out until that many tokens exist.
    held = SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100.0}, min_tokens=4)
    out = llm.generate(PROMPTS[0], held)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]
    full = llm.generate(PROMPTS[2], GREEDY)[0].outputs[0]
    stop = full.text[5:9]
    kept = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    out = llm.generate(PROMPTS[2], kept)[0].outputs[0]
    assert out.text == full.text[: full.text.find(stop) + len(stop)]


def test_skip_special_tokens(llm):
    special = llm.tokenizer.token_to_id("<|header_start|>")
    params = dict(max_tokens=3, temperature=0, logit_bias={special: 100.0}, ignore_eos=True)
    shown = llm.generate(PROMPTS[0], SamplingParams(skip_special_tokens=False, **params))[0].outputs[0]
    hidden = llm.generate(PROMPTS[0], SamplingParams(**params))[0].outputs[0]
    assert shown.token_ids == hidden.token_ids == [special] * 3
    assert shown.text == "<|header_start|>" * 3 and hidden.text == ""
