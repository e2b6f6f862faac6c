"""Continuous batching, chunked prefill, preemption and prefix caching keep outputs exact."""

import pytest
import torch

from herd import LLM, SamplingParams
from herd.engine.sampling import SamplingParams as SP
from tests.checkpoints import make_hf_model, save_checkpoint, text_config

LENGTHS = [3, 5, 9, 12, 17, 20, 25, 31, 33, 40, 47, 52, 64, 70, 85, 100]  # chunk 16, budget 32
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = make_hf_model(text_config(interleave_moe_layer_step=2, num_experts_per_tok=2))
    return hf, save_checkpoint(hf, tmp_path_factory.mktemp("batching"))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in LENGTHS]


def _assert_no_leaks(llm):
    engine = llm.engine
    assert not engine.has_unfinished()
    for pool in engine.cache.pools.values():
        assert pool.num_free == pool.num_blocks and not any(pool.ref_count)


def _assert_same(results, expected):
    for got, want in zip(results, expected):
        g, w = got.outputs[0], want.outputs[0]
        assert g.token_ids == w.token_ids
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) <= 1e-4


@pytest.fixture(scope="module")
def alone(checkpoint, prompts):
    llm = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4)
    results = [llm.generate(p, PARAMS)[0] for p in prompts]
    _assert_no_leaks(llm)
    return results


def test_alone_matches_transformers(checkpoint, prompts, alone):
    hf = checkpoint[0]
    for prompt, result in zip(prompts, alone):
        out = result.outputs[0]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1 :]
        ref = torch.log_softmax(logits.float(), -1)
        assert ref.argmax(-1).tolist() == out.token_ids
        for i, token in enumerate(out.token_ids):
            assert abs(out.logprobs[i][token] - ref[i, token].item()) <= 1e-4


def test_sixteen_together_with_chunked_prefill(checkpoint, prompts, alone):
    llm = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=32)
    _assert_same(llm.generate(prompts, PARAMS), alone)
    _assert_no_leaks(llm)


def test_preemption_several_times(checkpoint, prompts, alone):
    # 40 blocks of 4 tokens: far less than the 16 requests need together.
    llm = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4, kv_cache_tokens=160,
              max_num_batched_tokens=32)
    _assert_same(llm.generate(prompts, PARAMS), alone)
    assert llm.engine.scheduler.num_preemptions >= 3
    _assert_no_leaks(llm)


def test_prefix_caching_reuses_and_matches(checkpoint):
    shared = list(range(3, 83))  # 80 tokens: five chunks of 16
    first, second = shared + [90, 91, 92], shared + [100, 101]
    cached = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4)
    plain = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4, enable_prefix_caching=False)
    a = cached.generate(first, PARAMS)[0]
    assert a.num_cached_tokens == 0
    before = cached.engine.scheduler.num_computed_tokens
    b = cached.generate(second, PARAMS)[0]
    computed = cached.engine.scheduler.num_computed_tokens - before
    assert b.num_cached_tokens == 80
    assert computed == len(second) - 80 + PARAMS.max_tokens - 1
    _assert_same([a, b], plain.generate([first, second], PARAMS))
    _assert_no_leaks(cached)
    assert cached.engine.stats().prefix_hits == 80


def test_prefix_hit_needs_only_the_current_chunk(checkpoint):
    """Chunked layers' blocks before the current chunk are gone once a sequence moves on; a
    later request with the same prefix still hits, since those blocks are never needed."""
    llm = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4)
    prompt = list(range(3, 60))
    llm.generate(prompt + [1], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    # Evict most chunked blocks by pushing other long sequences through.
    llm.generate([list(range(60, 120)), list(range(10, 70))], SamplingParams(max_tokens=4, temperature=0))
    out = llm.generate(prompt + [2], PARAMS)[0]
    assert out.num_cached_tokens > 0
    plain = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4, enable_prefix_caching=False)
    _assert_same([out], plain.generate([prompt + [2]], PARAMS))


def test_n_samples_share_the_prompt(checkpoint, prompts):
    llm = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4)
    prompt = prompts[-1]
    params = SP(max_tokens=8, temperature=1.0, seed=11, n=3, ignore_eos=True)
    out = llm.generate(prompt, params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    single = llm.generate(prompt, SP(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == single.outputs[0].token_ids
    # Samples after the first found the prompt's blocks in the cache.
    assert llm.engine.stats().prefix_hits >= 2 * (len(prompt) // 4 * 4 - 4)
    _assert_no_leaks(llm)


def test_abort_frees_everything(checkpoint, prompts):
    llm = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=32)
    engine = llm.engine
    ids = [engine.add_request(p, PARAMS) for p in prompts[:6]]
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    for rid in ids:
        engine.abort(rid)
    _assert_no_leaks(llm)


def test_request_larger_than_cache_is_refused(checkpoint):
    llm = LLM(str(checkpoint[1]), dtype="float32", device="cpu", block_size=4, kv_cache_tokens=64)
    with pytest.raises(ValueError, match="KV cache holds"):
        llm.generate(list(range(3, 103)), PARAMS)
    # A prompt that fits alone but whose generation outgrows the cache ends instead of hanging.
    out = llm.generate(list(range(3, 60)), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason in ("length", "error")
    _assert_no_leaks(llm)
