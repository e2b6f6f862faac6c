"""Engine options are checked against the model's config before any weight is read; the block
size is chosen to divide the attention chunk when none is given."""

import json
import logging

import pytest

from herd import LLM, SamplingParams
from herd.engine.options import choose_block_size, default_cpu_threads

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = "Mixture-of-experts models route each token " * 8  # crosses several 60-token chunks


def _with_config(src, dst, *, weights=True, **text_overrides):
    """A copy of a checkpoint with text_config fields changed; without weights when weights=False
    (then anything that gets as far as reading them fails)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" or weights:
            (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(text_overrides)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_choose_block_size():
    assert choose_block_size(None) == 16
    assert choose_block_size(8192) == 16
    assert choose_block_size(60) == 15
    assert choose_block_size(8200) == 10
    assert choose_block_size(61) == 1  # a prime chunk still works, with one-token blocks


def test_auto_block_size_divides_the_chunk(demo_dir, tmp_path, caplog):
    ckpt = _with_config(demo_dir, tmp_path / "chunk60", attention_chunk_size=60)
    with caplog.at_level(logging.INFO, logger="herd.engine"):
        auto = LLM(str(ckpt), dtype="float32", device="cpu")
    assert auto.engine.cache.block_size == 15
    assert "block size 15" in caplog.text
    by_hand = LLM(str(ckpt), dtype="float32", device="cpu", block_size=4)
    out = auto.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert out == by_hand.generate(PROMPT, GREEDY)[0].outputs[0].token_ids


def test_explicit_block_size_that_does_not_divide_is_refused_before_the_weights(demo_dir, tmp_path):
    ckpt = _with_config(demo_dir, tmp_path / "noweights", weights=False, attention_chunk_size=60)
    with pytest.raises(ValueError, match="block_size 16 must divide attention_chunk_size 60"):
        LLM(str(ckpt), dtype="float32", device="cpu", block_size=16)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"some_unknown_option": 1}, "unknown option 'some_unknown_option'"),
        ({"max_model_len": 10**9}, "max_model_len 1000000000 must be in"),
        ({"kv_cache_dtype": "int4"}, "unsupported kv_cache_dtype"),
        ({"quantization": "int4"}, "unsupported quantization"),
        ({"max_num_seqs": 0}, "max_num_seqs must be at least 1"),
        ({"block_size": 0}, "block_size must be at least 1"),
        ({"dtype": "int8"}, "unsupported dtype"),
        ({"limit_mm_per_prompt": -1}, "limit_mm_per_prompt"),
        ({"cpu_threads": 0}, "cpu_threads must be a positive integer"),
    ],
)
def test_bad_options_fail_before_the_weights(demo_dir, tmp_path, options, message):
    ckpt = _with_config(demo_dir, tmp_path / "noweights", weights=False)
    with pytest.raises(ValueError, match=message):
        LLM(str(ckpt), device="cpu", **options)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block-size", "16"], "block_size 16 must divide attention_chunk_size 60"),
        (["--max-model-len", "100000"], "max_model_len 100000 must be in"),
        (["--limit-mm-per-prompt", '{"video": 1}'], "images only, not video"),
        (["--limit-mm-per-prompt", "image=x"], "cannot read"),
        (["--chat-template", "/no/such/file"], "neither a file nor a template"),
    ],
)
def test_serve_checks_its_options_before_the_weights(demo_dir, tmp_path, capsys, argv, message):
    from herd.cli import main

    ckpt = _with_config(demo_dir, tmp_path / "noweights", weights=False, attention_chunk_size=60)
    assert main(["serve", str(ckpt), "--no-platform", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "safetensors" not in err


def test_serve_refuses_image_limits_for_a_text_only_model(tmp_path, capsys):
    from herd.cli import main
    from tests.checkpoints import text_config

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Llama4ForCausalLM"], **text_config()}))
    assert main(["serve", str(tmp_path), "--no-platform", "--limit-mm-per-prompt", '{"image": 2}']) == 2
    assert "no vision tower" in capsys.readouterr().err


def test_cpu_threads_default_leaves_a_core_and_the_option_sets_them(demo_dir, monkeypatch):
    import os

    import torch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert default_cpu_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert default_cpu_threads() == 1
    before = torch.get_num_threads()
    try:
        LLM(str(demo_dir), device="cpu", cpu_threads=1)
        assert torch.get_num_threads() == 1
        LLM(str(demo_dir), device="cpu")  # the default: one core left to the front end, at least one
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
