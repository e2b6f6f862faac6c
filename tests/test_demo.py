"""The demo checkpoint: deterministic, in the public format, with Llama 4's real special ids."""

import hashlib
import json

from herd.config import load_config
from herd.demo import write_demo_model


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_demo_is_deterministic(demo_dir, tmp_path):
    again = write_demo_model(tmp_path / "again")
    assert _digest(again) == _digest(demo_dir)


def test_demo_format_and_ids(demo_dir):
    names = {f.name for f in demo_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja"} <= names
    cfg = load_config(demo_dir)
    t = cfg.text
    assert cfg.is_multimodal and cfg.vision is not None
    assert t.vocab_size == 202048
    assert t.bos_token_id == 200000 and t.eos_token_id == [200001, 200007, 200008] and t.pad_token_id == 200018
    # Both kinds of feed-forward and both kinds of attention, and a chunk small enough to cross.
    assert any(t.is_moe(i) for i in range(t.num_hidden_layers))
    assert not all(t.is_moe(i) for i in range(t.num_hidden_layers))
    assert {t.is_chunked(i) for i in range(t.num_hidden_layers)} == {True, False}
    assert t.attention_chunk_size <= 128
    assert t.max_position_embeddings == 8192
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert generation["max_new_tokens"] > 0
    assert generation["eos_token_id"] == [200001, 200007, 200008]
