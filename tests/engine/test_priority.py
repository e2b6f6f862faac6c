"""Request priority (SamplingParams.priority, lower first): interactive work is admitted ahead of
queued batch work, may preempt it, and every output stays exactly what it is alone."""

import pytest
import torch

from herd import LLM, SamplingParams
from tests.checkpoints import make_hf_model, save_checkpoint, text_config

BATCH = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, priority=1)
ONLINE = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = make_hf_model(text_config())
    return save_checkpoint(hf, tmp_path_factory.mktemp("priority"))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 14, 21, 30, 11)]


def _alone(checkpoint, prompts):
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", block_size=4)
    return [llm.generate(p, ONLINE)[0].outputs[0].token_ids for p in prompts]


def _run(engine, ids):
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    return [final[i] for i in ids]


def _no_leaks(engine):
    for pool in engine.cache.pools.values():
        assert pool.num_free == pool.num_blocks and not any(pool.ref_count)


def test_queued_interactive_request_is_admitted_before_batch_work(checkpoint, prompts):
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", block_size=4, max_num_seqs=1)
    engine = llm.engine
    batch = [engine.add_request(p, BATCH) for p in prompts[:3]]
    engine.step()  # the first batch line runs; two wait
    online = engine.add_request(prompts[3], ONLINE)
    assert [r.request_id for r in engine.scheduler.waiting][0] == online
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    # The interactive request preempted the running batch line and finished first.
    assert order[0] == online
    assert engine.scheduler.num_preemptions == 1
    assert sorted(order) == sorted(batch + [online])
    _no_leaks(engine)


def test_preempted_batch_work_gives_the_same_tokens(checkpoint, prompts):
    alone = _alone(checkpoint, prompts)
    # A small cache: interactive requests arriving late push batch lines out, more than once.
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", block_size=4, kv_cache_tokens=96,
              max_num_batched_tokens=16)
    engine = llm.engine
    ids = [engine.add_request(p, BATCH) for p in prompts[:3]]
    for _ in range(3):
        engine.step()
    ids += [engine.add_request(p, ONLINE) for p in prompts[3:]]
    assert _run(engine, ids) == alone
    assert engine.scheduler.num_preemptions >= 1
    _no_leaks(engine)


def test_equal_priorities_stay_first_come_first_served(checkpoint, prompts):
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", block_size=4, max_num_seqs=1)
    engine = llm.engine
    ids = [engine.add_request(p, BATCH) for p in prompts[:3]]
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ids
    assert engine.scheduler.num_preemptions == 0
