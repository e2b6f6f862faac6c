"""KV planning figures: per-token memory and longest context for a budget."""

import json
from pathlib import Path

import pytest
import torch

from herd.config import parse_config
from herd.engine.kv_cache import KVCache
from herd.plan import kv_plan, main, parse_bytes

MAVERICK = Path(__file__).parent / "fixtures" / "configs" / "maverick_published.json"


def test_maverick_kv_per_token():
    cfg = parse_config(json.loads(MAVERICK.read_text())).text
    plan = kv_plan(cfg, "bfloat16")
    # 12 global layers x 8 kv heads x 128 x (K, V) x 2 bytes = 48 KiB; all 48 layers = 192 KiB.
    assert plan.bytes_per_token_global == 48 * 1024
    assert plan.bytes_per_token_all_layers == 192 * 1024
    assert kv_plan(cfg, "fp8").bytes_per_token_global == 24 * 1024
    budget = parse_bytes("40GiB")
    longest = plan.max_context(budget)
    assert longest * plan.bytes_per_token_global + plan.per_sequence_fixed <= budget
    assert (longest + 1) * plan.bytes_per_token_global + plan.per_sequence_fixed > budget
    # Without chunk release the same budget would hold about a quarter of that.
    assert budget // plan.bytes_per_token_all_layers < longest / 3.5


def test_plan_matches_the_cache_herd_allocates(demo_dir):
    from herd.config import load_config

    cfg = load_config(demo_dir).text
    cache = KVCache(cfg, {"global": 10, "chunked": 10}, 16, torch.bfloat16)
    global_bytes = sum(l.k.nbytes + l.v.nbytes for l in cache.layers if l.group == "global")
    assert global_bytes == 10 * 16 * kv_plan(cfg).bytes_per_token_global


@pytest.mark.parametrize("text, value", [("40GiB", 40 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_cli_prints_longest_context(capsys):
    assert main([str(MAVERICK), "--kv-memory", "40GiB"]) == 0
    out = capsys.readouterr().out
    assert "48.0 KiB" in out and "longest context" in out
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_maverick_fp8_on_eight_h100s_per_rank(capsys):
    # Meta's FP8 layout (routed experts FP8): ~48 GiB of text weights per rank at TP=8, one KV
    # head per rank: 12 global layers x 128 x (K, V) x 2 bytes = 6 KiB per token.
    assert main([str(MAVERICK), "-tp", "8", "--quantization", "fp8", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "KV heads 1 of 8" in out and "6.0 KiB in global layers" in out
    weights = float(out.split("weights: ")[1].split(" GiB")[0])
    assert 45 < weights < 52
    assert main([str(MAVERICK), "-tp", "16"]) == 2
    assert "valid sizes (tensor parallel): 1, 2, 4, 8" in capsys.readouterr().err
