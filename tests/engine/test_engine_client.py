"""EngineClient and the engine-core process: concurrent streams equal to the offline engine,
stop strings, aborts that free KV blocks, refusals before streaming, start-up failures that say
why; EngineCore's failing step (in-process, no transport); image pixels as raw frames."""

import asyncio
import dataclasses
import json

import pytest
import torch

from herd import LLM, SamplingParams
from herd.engine import messages as m
from herd.engine.client import EngineClient, EngineStartError
from herd.engine.request import ImageInput

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(demo_dir):
    e = EngineClient.start(str(demo_dir), dtype="float32", device="cpu")
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
    with_logprobs = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2, n=2)

    async def run_all():
        streams = [_collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(prompts)]
        streams.append(_collect(engine, prompts[0], with_logprobs, "lp"))
        return await asyncio.gather(*streams)

    results = asyncio.run(run_all())
    llm = LLM(str(demo_dir), dtype="float32", device="cpu")
    offline = llm.generate(prompts, GREEDY)
    for (streamed, last), ref in zip(results, offline):
        assert last.finished and last.outputs[0].token_ids == ref.outputs[0].token_ids
        assert streamed == last.outputs[0].text == ref.outputs[0].text
    last, ref = results[-1][1], llm.generate(prompts[0], with_logprobs)[0]
    assert [o.token_ids for o in last.outputs] == [o.token_ids for o in ref.outputs]
    for got, want in zip(last.outputs, ref.outputs):
        assert len(got.logprobs) == 16 and got.logprobs[0].keys() == want.logprobs[0].keys()
        assert all(abs(got.logprobs[0][t] - want.logprobs[0][t]) < 1e-4 for t in want.logprobs[0])


def test_prompt_logprobs_arrive_once(engine):
    prompt = _prompt(engine, "echo me")
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=1)
    _, last = asyncio.run(_collect(engine, prompt, params, "echo"))
    assert len(last.prompt_logprobs) == len(prompt) and last.prompt_logprobs[0] is None
    assert all(isinstance(p, dict) and p for p in last.prompt_logprobs[1:])


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

    async def scenario():
        async for out in engine.generate(prompt, params, "leaver"):
            if len(out.outputs[0].token_ids) >= 3:
                assert engine.stats().kv_blocks_used > 0
                break  # the client went away
        for _ in range(200):
            stats = engine.stats()
            if stats.kv_blocks_used == 0 and stats.num_running == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(scenario())


def test_invalid_requests_raise_before_streaming(engine):
    async def run(prompt, params):
        async for _ in engine.generate(prompt, params, "bad"):
            pass

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(run([], GREEDY))
    with pytest.raises(ValueError, match="logit_bias"):
        asyncio.run(run([1, 2], SamplingParams(logit_bias={10**9: 1.0})))
    assert engine.is_running


def test_generation_config_defaults(engine):
    params = engine.default_params()
    assert params.temperature == 0.6 and params.top_p == 0.9 and params.max_tokens == 64
    assert engine.default_params(temperature=0.0).temperature == 0.0


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


def test_a_load_error_reaches_the_caller(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": {}}))
    with pytest.raises(EngineStartError, match="could not start"):
        EngineClient.start(str(tmp_path), dtype="float32", startup_timeout=120)


def test_a_failing_step_fails_its_requests_not_the_core(demo_dir):
    from herd.engine.core import EngineCore
    from herd.engine.engine import _load_engine

    core = EngineCore(_load_engine(str(demo_dir), "float32", "cpu", {}))
    core.clients.add(b"api")
    prompt = core.engine.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    runner = core.engine.runner
    real_execute = runner.execute

    def broken(batch):
        runner.execute = real_execute  # fail once, as an out-of-memory step would
        raise RuntimeError("simulated out of memory")

    runner.execute = broken
    core.add(b"api", m.AddRequest("doomed", prompt, GREEDY), [])
    core.step()
    [(client, message)] = core.take_messages()
    assert client == b"api" and [(e.request_id, e.invalid) for e in message.errors] == [("doomed", False)]
    assert "simulated out of memory" in message.errors[0].message and message.stats.kv_blocks_used == 0
    core.add(b"api", m.AddRequest("after", prompt, GREEDY), [])
    tokens = []
    while core.engine.has_unfinished():
        core.step()
        for _, message in core.take_messages():
            tokens += [t for d in message.outputs for s in d.seqs for t in s.token_ids]
    assert len(tokens) == GREEDY.max_tokens


def test_a_request_the_core_cannot_decode_fails_alone(engine):
    """The engine process flushes subnormal floats to zero; a value that is valid in the API
    process could arrive invalid there. Such a request fails as a bad request, alone."""
    import msgspec

    from herd.engine.core import EngineCore

    class Frame:
        def __init__(self, data):
            self.buffer = data

    core = EngineCore(engine=None)
    bad = msgspec.msgpack.encode(["odd", [1, 2], {"top_p": 0.0}])
    core.add_message(b"api", [Frame(b"api"), Frame(m.ADD), Frame(bad)])
    [error] = core._for(b"api").errors
    assert (error.request_id, error.invalid, error.message) == ("odd", True, "top_p must be in (0, 1]")
    # Through the real process: a subnormal top_p reaches the core as the smallest normal float.
    torch.set_flush_denormal(False)  # an in-process engine of an earlier test set it in this process
    params = SamplingParams(max_tokens=4, temperature=1.0, top_p=5e-324, seed=1)
    text, last = asyncio.run(_collect(engine, _prompt(engine, "tiny top_p"), params, "tiny-top-p"))
    assert last.finished and len(last.outputs[0].token_ids) == 4
    assert engine.is_running


def test_pixels_travel_as_raw_frames():
    pixels = torch.randn(2, 3, 8, 8)
    metas, frames = m.image_frames([ImageInput(pixels, b"hash", [3, 4, 5])])
    body = m.encoder.encode(m.AddRequest("r", [1, 2], GREEDY, None, metas))
    assert len(body) < 400 < pixels.numel() * 4 == len(frames[0])  # the pixels are not in the msgpack body
    request = m.add_decoder.decode(body)
    [image] = m.images_from_frames(request.images, [bytes(f) for f in frames])
    assert torch.equal(image.pixel_values, pixels) and image.patch_positions == [3, 4, 5]
    assert image.content_hash == b"hash" and request.params == GREEDY


@pytest.fixture(scope="module")
def llm(demo_dir):
    return LLM(str(demo_dir), dtype="float32", device="cpu")


def _stop_in_first_only(a: str, b: str) -> str:
    """Three characters early in `a` that never occur in `b`."""
    return next(a[k : k + 3] for k in range(2, len(a) - 3) if a[k : k + 3].strip() and a[k : k + 3] not in b)


def _until(predicate, timeout_s: float = 4.0):
    async def wait():
        for _ in range(int(timeout_s / 0.02)):
            if predicate():
                return True
            await asyncio.sleep(0.02)
        return False

    return wait()


def test_stop_strings_are_matched_in_the_api_server_and_end_the_core_sample(engine, llm):
    """The core sends token ids only; the client finds the stop string, cuts the text and the
    tokens exactly as the in-process engine does (nothing sampled after the match leaks), and
    aborts the sample in the core, which frees its blocks at once: with max_tokens=4000 the
    core would otherwise run for a minute."""
    prompt = _prompt(engine, "tell me a story")
    full = llm.generate(prompt, GREEDY)[0].outputs[0].text
    stop = full[4:7]
    long = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True, stop=[stop])
    ref = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))[0].outputs[0]

    async def one():
        streamed, last = await _collect(engine, prompt, long, "stop-one")
        freed = await _until(lambda: engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0)
        return streamed, last, freed

    streamed, last, freed = asyncio.run(one())
    got = last.outputs[0]
    assert freed
    assert (got.finish_reason, got.stop_reason) == ("stop", stop) == (ref.finish_reason, ref.stop_reason)
    assert streamed == got.text == ref.text == full[: full.find(stop)]
    assert got.token_ids == ref.token_ids and last.num_generated_tokens == len(ref.token_ids)

    # n = 2: a stop string that ends the first sample only stops that sample in the core.
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=2, ignore_eos=True, logprobs=1)
    a, b = (o.text for o in llm.generate(prompt, sampled)[0].outputs)
    stop = _stop_in_first_only(a, b)
    both = dataclasses.replace(sampled, stop=[stop], include_stop_str_in_output=True)
    ref = llm.generate(prompt, both)[0].outputs

    async def two():
        stream = engine.generate(prompt, dataclasses.replace(both, max_tokens=4000), "stop-two")
        async for out in stream:
            first, second = out.outputs
            if first.finished:
                assert not second.finished
                one_left = await _until(lambda: engine.stats().num_running == 1)
                await stream.aclose()  # the other sample is aborted, as a client that leaves
                return first, one_left, await _until(lambda: engine.stats().kv_blocks_used == 0)

    first, one_left, freed = asyncio.run(two())
    assert one_left and freed
    assert (first.finish_reason, first.stop_reason) == ("stop", stop) == (ref[0].finish_reason, ref[0].stop_reason)
    assert first.text == ref[0].text == a[: a.find(stop) + len(stop)]
    assert first.token_ids == ref[0].token_ids and len(first.logprobs) == len(first.token_ids)
    assert ref[1].finish_reason == "length" and len(ref[1].token_ids) == 16


def test_aborting_one_sample(llm):
    """Engine.abort of one sample's sequence id (what the API server sends when a stop string
    ends it) frees that sample alone; the request ends with its last sample."""
    engine = llm.engine
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "two of them"}])
    engine.add_request(prompt, SamplingParams(max_tokens=50, temperature=1.0, seed=1, n=2, ignore_eos=True), "pair")
    for _ in range(3):
        engine.step_tokens()
    assert engine.stats().num_running == 2
    assert engine.abort("pair#0") is None  # the request goes on with its other sample
    assert engine.stats().num_running == 1 and engine.has_request("pair")
    progressed = engine.step_tokens()
    assert [s.index for s in progressed[0].seqs] == [1]
    assert engine.abort("pair#1") == "pair"  # its last sample: the request is over
    assert not engine.has_request("pair") and engine.stats().kv_blocks_used == 0
    assert engine.abort("pair") is None and not engine.has_unfinished()
