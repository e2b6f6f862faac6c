"""Write the real Llama 4 tokenizer, in Hugging Face format, for the demo checkpoint.

Meta ships the Llama 4 vocabulary with `llama-models` as a tiktoken file (200,000 BPE ranks);
the 2,048 special tokens that follow it (ids 200000..202047) are only defined in code, in
`llama_models/llama4/tokenizer.py`. We take both from there, so the demo checkpoint tokenizes
exactly like a real Llama 4 checkpoint, and write the files an HF checkpoint carries:
tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja.

transformers is only needed here (for its tiktoken -> BPE converter), so it is imported lazily;
herd's runtime tokenizer (herd/tokenizer.py) reads the written files with `tokenizers` alone.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
# Instruct checkpoints name the end-of-turn token as eos in tokenizer_config.json (as Meta's HF
# repos do); the full stop list (end_of_text, eom, eot) lives in generation_config.json.
EOT = "<|eot|>"
PAD = "<|finetune_right_pad|>"
# Context length of Llama 4 Scout; only informative (HF uses it to warn on long inputs).
MODEL_MAX_LENGTH = 10485760

# Ids read from llama-models' tokenizer; checked after conversion so a changed converter or
# vocabulary file can never silently produce a tokenizer that disagrees with the model.
EXPECTED_IDS = {
    "<|begin_of_text|>": 200000,
    "<|end_of_text|>": 200001,
    "<|header_start|>": 200005,
    "<|header_end|>": 200006,
    "<|eom|>": 200007,
    "<|eot|>": 200008,
    "<|python_start|>": 200016,
    "<|python_end|>": 200017,
    "<|finetune_right_pad|>": 200018,
    "<|image_start|>": 200080,
    "<|image_end|>": 200081,
    "<|tile_x_separator|>": 200084,
    "<|tile_y_separator|>": 200085,
    "<|image|>": 200090,
    "<|patch|>": 200092,
}
VOCAB_SIZE = 202048


def llama4_chat_template() -> str:
    """The Llama 4 Instruct chat template shipped with herd (package data)."""
    # Read with newline="" so the template's exact bytes (it has a trailing-space line) survive.
    with open(Path(__file__).parent / "templates" / "llama4_chat_template.jinja", encoding="utf-8", newline="") as f:
        return f.read()


def _meta_vocab():
    """(path of tokenizer.model, regex pattern, special tokens in id order) from llama-models."""
    from llama_models.llama4 import tokenizer as meta

    model_path = Path(meta.__file__).parent / "tokenizer.model"
    # Rebuild the special-token list the way Meta's Tokenizer.__init__ does: the named tokens,
    # then reserved fillers up to 2,048. Order is what fixes the ids, so keep it exact.
    named = meta.BASIC_SPECIAL_TOKENS + meta.LLAMA4_SPECIAL_TOKENS
    n = meta.Tokenizer.num_reserved_special_tokens
    specials = named + [f"<|reserved_special_token_{i}|>" for i in range(n - len(named))]
    return model_path, meta.Tokenizer.O200K_PATTERN, specials


def write_llama4_tokenizer(out_dir: str | Path) -> None:
    """Write the Llama 4 tokenizer files into out_dir (created if missing)."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path, pattern, specials = _meta_vocab()

    # Specials go in as `extra_special_tokens`, all of them in order: they are appended after the
    # 200,000 ranks, giving ids 200000..202047. (Passing them as additional_special_tokens loses
    # them / shifts ids; see shared/LLAMA4.md.)
    tok = TikTokenConverter(vocab_file=str(model_path), pattern=pattern, extra_special_tokens=specials).converted()
    # Like Meta's HF checkpoints: encoding with special tokens on prepends <|begin_of_text|>.
    # (Chat templates write the BOS themselves and are encoded with special tokens off.)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )

    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(f"converted Llama 4 tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    for token, want in EXPECTED_IDS.items():
        got = tok.token_to_id(token)
        if got != want:
            raise RuntimeError(f"converted Llama 4 tokenizer maps {token} to {got}, expected {want}")

    template = llama4_chat_template()
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_map = {"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}

    # tokenizers serialises its vocab sorted by id and the added tokens in order, and json.dumps
    # with sort_keys is stable, so the same inputs always give the same bytes.
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8", newline="")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
