"""AsyncEngine: concurrent streams from one background loop, aborts that free at once."""

import asyncio

import pytest

from herd import LLM, SamplingParams
from herd.engine.engine import AsyncEngine

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(demo_dir):
    e = AsyncEngine.from_pretrained(str(demo_dir), dtype="float32", device="cpu")
    e.start()
    yield e
    e.shutdown()


def _prompt(engine, text):
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


async def _collect(engine, prompt, params, request_id):
    deltas, last = [], None
    async for out in engine.generate(prompt, params, request_id):
        deltas.append(out.outputs[0].delta_text)
        last = out
    return "".join(deltas), last


def test_concurrent_streams_equal_offline(engine, demo_dir):
    texts = [f"Question number {i}: " + "why? " * i for i in range(8)]
    prompts = [_prompt(engine, t) for t in texts]

    async def run_all():
        return await asyncio.gather(*(_collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(prompts)))

    results = asyncio.run(run_all())
    offline = LLM(str(demo_dir), dtype="float32", device="cpu").generate(prompts, GREEDY)
    for (streamed, last), ref in zip(results, offline):
        assert last.finished and last.outputs[0].token_ids == ref.outputs[0].token_ids
        assert streamed == last.outputs[0].text == ref.outputs[0].text


def test_stop_string_never_leaks_into_deltas(engine):
    prompt = _prompt(engine, "tell me something")
    full = asyncio.run(_collect(engine, prompt, GREEDY, "full"))[1].outputs[0].text
    stop = full[4:7]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    streamed, last = asyncio.run(_collect(engine, prompt, params, "stopped"))
    assert last.outputs[0].finish_reason == "stop"
    assert streamed == full[: full.find(stop)] and stop not in streamed


def test_breaking_out_aborts_and_frees_blocks(engine):
    prompt = _prompt(engine, "a long answer please")
    params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)

    async def consume_a_little():
        async for out in engine.generate(prompt, params, "leaver"):
            if len(out.outputs[0].token_ids) >= 3:
                break  # the client went away

    async def wait_until_idle():
        for _ in range(200):
            stats = engine.stats()
            if stats.kv_blocks_used == 0 and stats.num_running == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    async def scenario():
        await consume_a_little()
        return await wait_until_idle()

    assert asyncio.run(scenario())


def test_invalid_request_raises_before_streaming(engine):
    async def bad():
        async for _ in engine.generate([], GREEDY, "empty"):
            pass

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(bad())
    assert engine.is_running


def test_generation_config_defaults(engine, demo_dir):
    params = engine.default_params()
    assert params.temperature == 0.6 and params.top_p == 0.9 and params.max_tokens == 64
    assert engine.default_params(temperature=0.0).temperature == 0.0


def test_a_failing_step_fails_its_requests_not_the_engine(engine):
    prompt = _prompt(engine, "hello")
    runner = engine.engine.runner
    real_execute = runner.execute

    def broken(batch):
        runner.execute = real_execute  # fail once, as an out-of-memory step would
        raise RuntimeError("simulated out of memory")

    runner.execute = broken
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        asyncio.run(_collect(engine, prompt, GREEDY, "doomed"))
    assert engine.is_running
    _, last = asyncio.run(_collect(engine, prompt, GREEDY, "after"))
    assert last.finished and len(last.outputs[0].token_ids) == GREEDY.max_tokens


def test_duplicate_request_ids_are_refused(engine):
    prompt = _prompt(engine, "twice")
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def scenario():
        first = engine.generate(prompt, params, "same-id")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate(prompt, params, "same-id").__anext__()
        await first.aclose()

    asyncio.run(scenario())
