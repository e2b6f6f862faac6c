"""FP8 checkpoints made by llm-compressor (tests/fixtures/fp8, see make_fp8_fixtures.py) against
transformers + compressed-tensors, quantize-on-load against the offline tool, layouts and errors.

Logit bound: herd and the reference (tests/quant/oracle.py) run the same W8A8 numerics in
float32 (weights q * scale exact, activations quantized per token with scale amax/448), so they
differ only by float32 summation order, measured at ~1.5e-6. A single activation rounded to a
different E4M3 value would move logits by ~1e-3 and a different router choice by ~0.1, so
1e-4 (the bf16 parity tests' bound) catches any real numeric difference; FP8's own error
against the bf16 model is ~0.06-0.5 here, and the test checks it is over 100x the bound.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from herd import LLM, SamplingParams
from herd.checkpoint import CheckpointError, load_text_model
from herd.config import load_config
from herd.model.quant import FP8_DTYPE, Fp8Linear, Fp8RoutedExperts
from tests.model_utils import herd_logits
from tests.quant.oracle import load_reference

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fp8"
LOGIT_BOUND = 1e-4
GREEDY_TOKENS = 32


def _prompt(n=70, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n,), generator=g).tolist()


def _load(path, dtype=torch.float32, **kw):
    return load_text_model(path, load_config(path), dtype, **kw)


def _copy(name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


@pytest.fixture(scope="module")
def bf16_logits():
    return herd_logits(_load(FIXTURES / "bf16"), _prompt())


@pytest.mark.parametrize("name", ["experts", "all"])
def test_fp8_checkpoint_matches_transformers(name, bf16_logits):
    ref_model = load_reference(FIXTURES / name)
    prompt = _prompt()
    with torch.no_grad():
        ref = ref_model(torch.tensor([prompt])).logits[0].float()
    ours = herd_logits(_load(FIXTURES / name), prompt)
    assert (ours - ref).abs().max().item() <= LOGIT_BOUND
    # The comparison is discriminating: FP8 really changes the logits, far beyond the bound.
    assert (ours - bf16_logits).abs().max().item() > 100 * LOGIT_BOUND

    llm = LLM(str(FIXTURES / name), dtype="float32", device="cpu", block_size=4)
    out = llm.generate(prompt, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True))[0]
    tokens = out.outputs[0].token_ids
    with torch.no_grad():
        teacher = ref_model(torch.tensor([prompt + tokens[:-1]])).logits[0]
    assert teacher[len(prompt) - 1 :].argmax(-1).tolist() == tokens


def test_fp8_weights_stay_one_byte_per_parameter():
    model = _load(FIXTURES / "experts", torch.bfloat16)
    experts = [m for m in model.modules() if isinstance(m, Fp8RoutedExperts)]
    assert len(experts) == 2 and not any(isinstance(m, Fp8Linear) for m in model.modules())
    for m in experts:
        assert m.gate_up_weight.dtype == m.down_weight.dtype == FP8_DTYPE
    # Nothing else is kept: the model's bytes are its checkpoint's (scales widened to float32).
    with safe_open(str(FIXTURES / "experts" / "model.safetensors"), "pt") as f:
        text = [k for k in f.keys() if not k.startswith("vision_model") and "multi_modal" not in k]
        ckpt_bytes = sum(
            f.get_slice(k).get_shape()[0] * 4 if k.endswith("weight_scale") else f.get_tensor(k).nbytes for k in text
        )
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == ckpt_bytes
    model_all = _load(FIXTURES / "all", torch.bfloat16)
    assert {type(m) for m in model_all.modules()} >= {Fp8Linear, Fp8RoutedExperts}
    assert model_all.lm_head.weight.dtype == torch.bfloat16
    assert model_all.layers[1].feed_forward.router.weight.dtype == torch.bfloat16


def test_startup_reports_the_fp8_path(caplog):
    with caplog.at_level("INFO", logger="herd.checkpoint"):
        model = _load(FIXTURES / "all")
    assert "FP8 matmul path: dequant" in model.weights_summary
    assert any("FP8 matmul path" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("policy, offline", [("fp8", "experts"), ("fp8-all", "all")])
def test_quantize_on_load_writes_the_offline_tools_tensors(policy, offline):
    """The bf16 fixture holds fused experts: herd quantizes them one expert at a time."""
    ours = _load(FIXTURES / "bf16", torch.bfloat16, quantization=policy).state_dict()
    theirs = _load(FIXTURES / offline, torch.bfloat16).state_dict()
    assert ours.keys() == theirs.keys()
    n_fp8 = 0
    for k, v in ours.items():
        assert v.dtype == theirs[k].dtype, k
        if v.dtype == FP8_DTYPE:
            n_fp8 += 1
            assert torch.equal(v.view(torch.uint8), theirs[k].view(torch.uint8)), k
        else:
            assert torch.equal(v, theirs[k]), k
    assert n_fp8 == (4 if policy == "fp8" else 32)


def test_llm_quantization_option_matches_offline_checkpoint():
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [_prompt(20, seed=s) for s in range(3)]
    on_load = LLM(str(FIXTURES / "bf16"), dtype="float32", device="cpu", block_size=4, quantization="fp8-all")
    offline = LLM(str(FIXTURES / "all"), dtype="float32", device="cpu", block_size=4)
    a = [o.outputs[0].token_ids for o in on_load.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in offline.generate(prompts, params)]
    assert a == b
    with pytest.raises(ValueError, match="unsupported quantization 'int4'"):
        LLM(str(FIXTURES / "bf16"), dtype="float32", device="cpu", quantization="int4")


def test_fused_fp8_expert_layout(tmp_path):
    """Experts fused as [E, in, out] FP8 tensors with per-row scales load like per-expert ones."""
    path = _copy("experts", tmp_path)
    tensors = load_file(path / "model.safetensors")
    for layer in (1, 3):
        base = f"language_model.model.layers.{layer}.feed_forward.experts"
        per = {
            (e, p): (tensors.pop(f"{base}.{e}.{p}_proj.weight"), tensors.pop(f"{base}.{e}.{p}_proj.weight_scale"))
            for e in range(4)
            for p in ("gate", "up", "down")
        }
        gate_up = [torch.cat([per[e, "gate"][0], per[e, "up"][0]]).T for e in range(4)]
        tensors[f"{base}.gate_up_proj"] = torch.stack([w.contiguous() for w in gate_up])
        tensors[f"{base}.gate_up_proj_scale"] = torch.stack(
            [torch.cat([per[e, "gate"][1], per[e, "up"][1]])[:, 0] for e in range(4)]
        )[:, None, :]
        tensors[f"{base}.down_proj"] = torch.stack([per[e, "down"][0].T.contiguous() for e in range(4)])
        tensors[f"{base}.down_proj_scale"] = torch.stack([per[e, "down"][1] for e in range(4)])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    prompt = _prompt(30)
    assert torch.equal(herd_logits(_load(path), prompt), herd_logits(_load(FIXTURES / "experts"), prompt))


def _set_quant(path, change):
    cfg = json.loads((path / "config.json").read_text())
    change(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_regex_ignore_list_as_in_metas_release(tmp_path):
    from herd.model.quant import META_IGNORE

    path = _copy("experts", tmp_path)
    _set_quant(path, lambda q: q.update(ignore=list(META_IGNORE)))
    prompt = _prompt(30)
    assert torch.equal(herd_logits(_load(path), prompt), herd_logits(_load(FIXTURES / "experts"), prompt))
    # An ignore entry naming a module that is FP8 all the same: the checkpoint contradicts it.
    _set_quant(path, lambda q: q["ignore"].append("re:.*experts\\.2\\."))
    with pytest.raises(CheckpointError, match=r"experts\.2\.\w+_proj is FP8 but .* ignore list"):
        _load(path)


def _group(q):
    return next(iter(q["config_groups"].values()))


UNSUPPORTED = {
    "gptq": (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq'"),
    "fbgemm": (lambda q: q.update(quant_method="fbgemm_fp8"), "quant_method 'fbgemm_fp8'"),
    "int4_weights": (
        lambda q: _group(q).update(
            format="pack-quantized",
            weights=dict(_group(q)["weights"], type="int", num_bits=4, strategy="group", group_size=128),
        ),
        "format 'pack-quantized'",
    ),
    "static_tensor_activations": (
        lambda q: _group(q)["input_activations"].update(dynamic=False, strategy="tensor"),
        "'strategy': 'tensor'",
    ),
    "weight_only": (lambda q: _group(q).update(input_activations=None), "weight-only"),
    "kv_scheme": (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_quantization_configs_are_named(tmp_path, case):
    change, found = UNSUPPORTED[case]
    path = _copy("experts", tmp_path)
    _set_quant(path, change)
    with pytest.raises(CheckpointError, match="unsupported quantization") as err:
        _load(path)
    assert found in str(err.value)


def test_fp8_weight_without_scale_is_refused(tmp_path):
    path = _copy("all", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["language_model.model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="q_proj.weight has no scale"):
        _load(path)
