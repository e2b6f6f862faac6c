"""Tensor and expert parallelism on CPU (gloo): through the real engine, outputs equal TP=1.

One checkpoint (MoE every other layer, top-2 of 4 experts, 4 query heads over 2 KV heads, so
that TP=4 replicates each KV head on two ranks), one mix of 16 requests exercising chunked
prefill, preemption, prefix caching, n > 1, seeded sampling and prompt logprobs. Each parallel
engine starts its worker processes once and runs the whole mix.
"""

import subprocess
import sys

import pytest
import torch

from herd import LLM, SamplingParams
from herd.parallel.sizes import ParallelConfigError
from tests.checkpoints import make_hf_model, save_checkpoint, text_config

LENGTHS = [3, 5, 9, 12, 17, 20, 25, 31, 33, 40, 47, 52, 64, 70, 85, 100]
# 40 blocks of 4 tokens (far less than the mix needs at once) and 32-token steps: chunked
# prefill and preemption both happen.
OPTIONS = dict(dtype="float32", device="cpu", block_size=4, kv_cache_tokens=160, max_num_batched_tokens=32)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = make_hf_model(text_config(interleave_moe_layer_step=2, num_experts_per_tok=2))
    return hf, save_checkpoint(hf, tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def mix():
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in LENGTHS]
    prompts[9] = prompts[12][:36] + prompts[9][36:]  # shares 9 blocks with another prompt
    params = [GREEDY] * len(prompts)
    params[3] = SamplingParams(max_tokens=8, temperature=0.9, seed=7, n=2, ignore_eos=True, logprobs=1)
    params[7] = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True)
    params[11] = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=2, logprobs=0)
    params[13] = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3, ignore_eos=True, logprobs=2)
    return prompts, params


def _run(llm, mix):
    prompts, params = mix
    results = llm.generate(prompts, params)
    engine = llm.engine
    assert not engine.has_unfinished()
    for pool in engine.cache.pools.values():
        assert pool.num_free == pool.num_blocks and not any(pool.ref_count)
    return results, engine.scheduler.num_preemptions, engine.stats().prefix_hits


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert max(abs(a[t] - b[t]) for t in a) <= 1e-4


def _assert_same(results, expected):
    for got, want in zip(results, expected):
        assert len(got.outputs) == len(want.outputs)
        for g, w in zip(got.outputs, want.outputs):
            assert g.token_ids == w.token_ids
            for a, b in zip(g.logprobs or [], w.logprobs or []):
                _close(a, b)
        if want.prompt_logprobs is not None:
            assert got.prompt_logprobs[0] is None and want.prompt_logprobs[0] is None
            for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
                _close(a, b)


@pytest.fixture(scope="module")
def single(checkpoint, mix):
    return _run(LLM(str(checkpoint[1]), **OPTIONS), mix)


_RUNS: dict = {}


def _parallel(checkpoint, mix, size, expert_parallel):
    """Each parallel configuration runs the mix once per module."""
    key = (size, expert_parallel)
    if key not in _RUNS:
        with LLM(str(checkpoint[1]), tensor_parallel_size=size, enable_expert_parallel=expert_parallel, **OPTIONS) as llm:
            shard = llm.model.config
            assert shard.num_attention_heads == 4 // size
            assert shard.num_key_value_heads == max(1, 2 // size)  # TP=4: each KV head on 2 ranks
            _RUNS[key] = _run(llm, mix)[0]
    return _RUNS[key]


@pytest.mark.parametrize("size,expert_parallel", [(2, False), (4, False), (2, True), (4, True)], ids=["tp2", "tp4", "tp2-ep2", "tp4-ep4"])
def test_parallel_matches_one_device(checkpoint, mix, single, size, expert_parallel):
    expected, preemptions, prefix_hits = single
    assert preemptions >= 1 and prefix_hits > 0  # the mix exercises what it claims to
    _assert_same(_parallel(checkpoint, mix, size, expert_parallel), expected)


def test_parallel_greedy_matches_transformers(checkpoint, mix):
    hf = checkpoint[0]
    prompts, params = mix
    results = _parallel(checkpoint, mix, 2, True)
    checked = 0
    for prompt, p, result in zip(prompts, params, results):
        if p is not GREEDY:
            continue
        out = result.outputs[0]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1 :]
        ref = torch.log_softmax(logits.float(), -1)
        assert ref.argmax(-1).tolist() == out.token_ids
        for i, token in enumerate(out.token_ids):
            assert abs(out.logprobs[i][token] - ref[i, token].item()) <= 1e-4
        checked += 1
    assert checked >= 10


def test_size_the_heads_do_not_divide_is_refused_at_start(checkpoint):
    with pytest.raises(ParallelConfigError, match=r"tensor_parallel_size 3 .*4 attention heads.*valid sizes.*: 1, 2, 4"):
        LLM(str(checkpoint[1]), tensor_parallel_size=3, **OPTIONS)


def test_two_nodes_of_one_rank_each(checkpoint, mix, single):
    """Node 1 runs `herd serve ... --nnodes 2 --node-rank 1` (its rank, no server); node 0's
    engine is rank 0. Both on 127.0.0.1."""
    from herd.parallel.executor import free_port

    prompts, params = mix[0][:4], mix[1][:4]
    port = free_port()
    node1 = subprocess.Popen(
        [sys.executable, "-m", "herd.cli", "serve", str(checkpoint[1]), "--dtype", "float32", "--device", "cpu",
         "--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "1", "--master-port", str(port)],
    )
    try:
        with LLM(str(checkpoint[1]), tensor_parallel_size=2, nnodes=2, node_rank=0, master_port=port, **OPTIONS) as llm:
            results = llm.generate(prompts, params)
        assert node1.wait(timeout=60) == 0  # rank 0 stopped it
    finally:
        if node1.poll() is None:
            node1.kill()
    _assert_same(results, single[0][:4])


def test_hung_worker_fails_the_step_within_the_collective_timeout(checkpoint, monkeypatch):
    import os
    import signal
    import time

    from herd.parallel.executor import RankFailure

    monkeypatch.setenv("HERD_COLLECTIVE_TIMEOUT", "5")
    llm = LLM(str(checkpoint[1]), tensor_parallel_size=2, **OPTIONS)
    worker = llm.engine.runner.workers[0]
    try:
        assert llm.generate([5, 6, 7], GREEDY)[0].outputs[0].token_ids
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="tensor-parallel step failed"):
            llm.generate([5, 6, 7], GREEDY)
        assert time.monotonic() - start < 30
        assert not llm.engine.has_unfinished()  # the failed requests were aborted
    finally:
        llm.close()
    assert worker.poll() is not None  # killed, not left stopped
