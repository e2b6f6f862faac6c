"""FP8 KV cache: E4M3 K/V with a scale per token and head, about half the bytes per token."""

from pathlib import Path

import torch

from herd import LLM, SamplingParams
from herd.config import load_config
from herd.engine.kv_cache import KVCache
from herd.model.attention import CHUNKED, GLOBAL, AttentionMetadata, GroupTables, LayerKV, SeqSlice, paged_attention
from herd.model.quant import fake_quantize_per_token

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fp8"


def test_fp8_kv_halves_bytes_per_token():
    text = load_config(FIXTURES / "bf16").text
    bf16 = KVCache.bytes_per_token(text, torch.bfloat16)
    fp8 = KVCache.bytes_per_token(text, torch.bfloat16, "fp8")
    assert fp8 / bf16 == (text.head_dim + 4) / (2 * text.head_dim)  # scales: 4 bytes per head
    blocks = {GLOBAL: 8, CHUNKED: 8}
    a = KVCache(text, blocks, 4, torch.bfloat16).nbytes()
    b = KVCache(text, blocks, 4, torch.bfloat16, kv_dtype="fp8").nbytes()
    assert b / a == fp8 / bf16
    # Maverick's head_dim 128: 0.516 of bf16, so ~1.94x the tokens in the same budget.


def test_fp8_kv_attention_is_attention_over_fake_quantized_kv():
    """Reading back an FP8 cache gives exactly K/V quantized per token and head."""
    torch.manual_seed(0)
    t, hq, hkv, d = 11, 4, 2, 16
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d) * 3, torch.randn(t, hkv, d)
    meta = AttentionMetadata(
        positions=torch.arange(t),
        seqs=[SeqSlice(0, t, t)],
        groups={GLOBAL: GroupTables(torch.arange(t), [torch.arange(3)])},
        block_size=4,
    )
    fp8 = LayerKV(
        torch.zeros(12, hkv, d, dtype=torch.float8_e4m3fn),
        torch.zeros(12, hkv, d, dtype=torch.float8_e4m3fn),
        GLOBAL,
        torch.zeros(12, hkv),
        torch.zeros(12, hkv),
    )
    plain = LayerKV(torch.zeros(12, hkv, d), torch.zeros(12, hkv, d), GLOBAL)
    out = paged_attention(q, k, v, fp8, meta, d**-0.5, None)
    fq = lambda x: fake_quantize_per_token(x.reshape(-1, d)).view(x.shape)  # noqa: E731
    ref = paged_attention(q, fq(k), fq(v), plain, meta, d**-0.5, None)
    assert (out - ref).abs().max().item() < 1e-6
    assert (out - paged_attention(q, k, v, plain, meta, d**-0.5, None)).abs().max().item() > 1e-4


def test_fp8_kv_engine_paths_agree():
    """Batched, chunked-prefill and prefix-cached runs with an FP8 cache give the unbatched tokens."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 128, (24,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9, 13)]
    kw = dict(dtype="float32", device="cpu", block_size=4, kv_cache_dtype="fp8")
    alone = [
        LLM(str(FIXTURES / "experts"), enable_prefix_caching=False, **kw).generate(p, params)[0].outputs[0].token_ids
        for p in prompts
    ]
    llm = LLM(str(FIXTURES / "experts"), max_num_batched_tokens=16, **kw)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert batched == alone
    again = llm.generate(prompts[0], params)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == alone[0]
