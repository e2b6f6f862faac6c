"""Converts a dense Llama GGUF file (llama.cpp's format) into a Llama 4 text checkpoint.

A dense Llama model is the Llama 4 text decoder with every layer dense (`moe_layers: []`),
every layer RoPE (`no_rope_layers` all 1) attending globally, no QK norm and no attention
temperature tuning. The output is a standard Hugging Face directory that herd (and transformers'
Llama4ForCausalLM) loads: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja and generation_config.json.

The `gguf` package reads and dequantizes the file (no llama.cpp build). Weights are written in
float32 by default: dequantized Q4/Q5/Q8 values are fp16 scale x small integer (+ fp16 offset),
which needs more mantissa than bfloat16 has; rounding them to bf16 would move logits by ~1e-2,
while float32 keeps the converted model bit-for-bit the model the GGUF file describes.

q_proj / k_proj rows: Meta's Llama (and Llama 4) apply RoPE to interleaved pairs (x[2i], x[2i+1]);
Hugging Face Llama checkpoints permute those rows into the rotate-half layout (x[i], x[i + d/2]),
and llama.cpp's converter permutes them back when it writes a GGUF file. `_gguf_to_rotate_half`
undoes llama.cpp's permutation (exactly what transformers does when it loads a GGUF file) and
`_rotate_half_to_interleaved` then puts row i / i + d/2 of each head at rows 2i / 2i + 1.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CONVERTER_VERSION = 2  # bump when the output of a conversion changes (cached checkpoints are redone)

SUPPORTED_ARCHITECTURES = ("llama",)
# Tensor types the `gguf` package dequantizes in numpy and that herd has checked.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

DTYPES = ("float32", "bfloat16")


class GGUFError(ValueError):
    """The GGUF file is unreadable, or describes a model or format herd cannot convert."""


# ------------------------------------------------------------------------------ reading


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on bad headers
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return default if value is None else value


def _check_tensor_types(reader) -> None:
    bad = [(t.name, t.tensor_type.name) for t in reader.tensors if t.tensor_type.name not in SUPPORTED_TYPES]
    if bad:
        kinds = sorted({kind for _, kind in bad})
        raise GGUFError(
            f"unsupported GGUF tensor type(s) {', '.join(kinds)} (e.g. tensor {bad[0][0]} is {bad[0][1]}); "
            f"herd converts {', '.join(SUPPORTED_TYPES)}"
        )


def read_hparams(reader) -> dict[str, Any]:
    """The model's shape from the GGUF metadata; raises GGUFError for anything not dense Llama."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"unsupported GGUF architecture {arch!r}: herd converts dense Llama models "
            f"(general.architecture {' or '.join(map(repr, SUPPORTED_ARCHITECTURES))}) only"
        )
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    if (a("expert_count") or 0) > 0:
        raise GGUFError(f"this GGUF file is a mixture-of-experts Llama ({a('expert_count')} experts): not supported")
    scaling = a("rope.scaling.type")
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"RoPE scaling ({scaling or 'rope_freqs'}) in GGUF files is not supported")
    required = {
        "block_count": "num_hidden_layers",
        "embedding_length": "hidden_size",
        "feed_forward_length": "intermediate_size",
        "attention.head_count": "num_attention_heads",
        "context_length": "max_position_embeddings",
    }
    hp: dict[str, Any] = {}
    for key, name in required.items():
        value = a(key)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{key}")
        hp[name] = int(value)
    hp["num_key_value_heads"] = int(a("attention.head_count_kv", hp["num_attention_heads"]))
    hp["head_dim"] = int(a("attention.key_length", hp["hidden_size"] // hp["num_attention_heads"]))
    rope_dim = a("rope.dimension_count", hp["head_dim"])
    if int(rope_dim) != hp["head_dim"]:
        raise GGUFError(f"partial RoPE (rope.dimension_count {rope_dim} < head_dim {hp['head_dim']}) is not supported")
    hp["rms_norm_eps"] = float(a("attention.layer_norm_rms_epsilon", 1e-5))
    hp["rope_theta"] = float(a("rope.freq_base", 10000.0))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    hp["vocab_size"] = int(a("vocab_size", len(tokens) if tokens is not None else 0))
    return hp


# ------------------------------------------------------------------------------ weights


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32, in PyTorch's [out, in] order."""
    import gguf

    kind = tensor.tensor_type
    if kind == gguf.GGMLQuantizationType.F32:
        out = np.array(tensor.data, dtype=np.float32)  # a copy: the reader's arrays are read-only
    else:
        out = gguf.quants.dequantize(tensor.data, kind).astype(np.float32, copy=False)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return out.reshape(shape)


def _gguf_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation (as transformers does when loading a GGUF file)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rotate_half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Row i / i + d/2 of each head (rotate-half pairs) -> rows 2i / 2i + 1 (Llama 4's pairs)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "feed_forward.gate_proj.weight",
    "ffn_up.weight": "feed_forward.up_proj.weight",
    "ffn_down.weight": "feed_forward.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def checkpoint_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFError(f"unexpected tensor {gguf_name!r} in a dense Llama GGUF file (biases and extras are not supported)")


def convert_tensor(tensor, hp: dict[str, Any]) -> tuple[str, np.ndarray]:
    """One GGUF tensor -> (Llama 4 checkpoint name, float32 array)."""
    name = checkpoint_name(tensor.name)
    w = _dequantize(tensor)
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = hp["num_attention_heads"] if name.endswith("q_proj.weight") else hp["num_key_value_heads"]
        w = _rotate_half_to_interleaved(_gguf_to_rotate_half(w, heads), heads)
    return name, np.ascontiguousarray(w)


def _expected_shapes(hp: dict[str, Any], tied: bool) -> dict[str, tuple[int, ...]]:
    h, d, v = hp["hidden_size"], hp["head_dim"], hp["vocab_size"]
    q, kv, ff = hp["num_attention_heads"] * d, hp["num_key_value_heads"] * d, hp["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (v, h)
    for i in range(hp["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "feed_forward.gate_proj.weight": (ff, h),
            p + "feed_forward.up_proj.weight": (ff, h),
            p + "feed_forward.down_proj.weight": (h, ff),
        }
    return shapes


# ------------------------------------------------------------------------------ config


def llama4_config(hp: dict[str, Any], special: dict[str, int | None], tied: bool, dtype: str) -> dict[str, Any]:
    n = hp["num_hidden_layers"]
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": hp["vocab_size"],
        "hidden_size": hp["hidden_size"],
        # Dense layers use intermediate_size_mlp; intermediate_size (experts) is unused here.
        "intermediate_size": hp["intermediate_size"],
        "intermediate_size_mlp": hp["intermediate_size"],
        "num_hidden_layers": n,
        "num_attention_heads": hp["num_attention_heads"],
        "num_key_value_heads": hp["num_key_value_heads"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": hp["max_position_embeddings"],
        "rms_norm_eps": hp["rms_norm_eps"],
        "rope_theta": hp["rope_theta"],
        "rope_scaling": None,
        # Every layer dense, every layer RoPE with global attention (the chunk spans the context).
        "num_local_experts": 1,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 0,
        "moe_layers": [],
        "no_rope_layers": [1] * n,
        "attention_chunk_size": hp["max_position_embeddings"],
        "layer_types": ["full_attention"] * n,
        "use_qk_norm": False,
        "attn_temperature_tuning": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tied,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "dtype": dtype,
    }


# ------------------------------------------------------------------------------ tokenizer

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


def _token(tokens: list[str], key: str, reader) -> str | None:
    i = _field(reader, f"tokenizer.ggml.{key}_token_id")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def write_tokenizer(reader, source: Path, out_dir: Path, max_length: int) -> dict[str, int | None]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja from the GGUF metadata.

    Byte-level BPE vocabularies ("gpt2", used by SmolLM, Llama 3, Qwen...) are rebuilt directly
    with `tokenizers`; others fall back to transformers' own GGUF tokenizer conversion.
    Returns the special token ids (bos, eos, pad, unk).
    """
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError("the GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
    tokens = list(tokens)
    if model == "gpt2":
        tokenizer_json = _bpe_tokenizer_json(reader, tokens)
        (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    else:
        _transformers_tokenizer(source, out_dir)

    template = _field(reader, "tokenizer.chat_template")
    names = {key: _token(tokens, key, reader) for key in ("bos", "eos", "padding", "unknown")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "pad_token": names["padding"],
        "unk_token": names["unknown"],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if template:
        config["chat_template"] = template
        (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    ids = {key: _field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding", "unknown")}
    return {
        "bos": _int_or_none(ids["bos"]),
        "eos": _int_or_none(ids["eos"]),
        "pad": _int_or_none(ids["padding"]),
        "unk": _int_or_none(ids["unknown"]),
    }


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def _bpe_tokenizer_json(reader, tokens: list[str]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's "smollm" pre-tokenizer splits every digit first, like SmolLM's own tokenizer.json.
    if _field(reader, "tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = _field(reader, "tokenizer.ggml.token_type") or []
    added = [
        AddedToken(tokens[i], special=t == _CONTROL, normalized=False)
        for i, t in enumerate(types)
        if t in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_tokens(added)  # already in the vocabulary: this only marks them as added / special
    return tok.to_str(pretty=True)


def _transformers_tokenizer(source: Path, out_dir: Path) -> None:
    """tokenizer.json via transformers' GGUF tokenizer conversion (SentencePiece and others)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    except Exception as e:
        raise GGUFError(f"cannot build a tokenizer from {source.name}: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        if not (Path(tmp) / "tokenizer.json").is_file():
            raise GGUFError(f"transformers wrote no tokenizer.json for {source.name}")
        shutil.copy(Path(tmp) / "tokenizer.json", out_dir / "tokenizer.json")


# ------------------------------------------------------------------------------ convert


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    progress: bool = False,
    replace: bool = True,
) -> Path:
    """Writes the Llama 4 text checkpoint for `gguf_path` into `out_dir`, atomically.

    The directory is built next to `out_dir` and renamed into place at the end, so an
    interrupted conversion never leaves a half-written checkpoint. An existing `out_dir` is
    replaced; with replace=False it is kept instead (another process finished first) and this
    conversion is discarded. Raises GGUFError for files herd cannot convert (before any work).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    hp = read_hparams(reader)
    _check_tensor_types(reader)
    names = [t.name for t in reader.tensors]
    for name in names:
        checkpoint_name(name)  # unknown tensors fail before any work
    tied = "output.weight" not in names
    expected = _expected_shapes(hp, tied)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        _write(reader, hp, tied, expected, tmp, dtype, progress, gguf_path)
        if out_dir.exists() and replace:
            shutil.rmtree(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:
            if replace or not (out_dir / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write(reader, hp, tied, expected, out: Path, dtype: str, progress: bool, source: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(
        reader.tensors, desc=f"converting {source.name}", unit="tensor", disable=not progress, file=sys.stderr
    )
    for tensor in bar:
        name, w = convert_tensor(tensor, hp)
        want = expected.get(name)
        if want is None:
            raise GGUFError(f"unexpected tensor {tensor.name} for a {hp['num_hidden_layers']}-layer model")
        if tuple(w.shape) != want:
            raise GGUFError(f"tensor {tensor.name} has shape {list(w.shape)}, the metadata implies {list(want)}")
        tensors[name] = torch.from_numpy(w).to(torch_dtype)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GGUFError(f"the GGUF file lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    if progress:
        print("writing model.safetensors and tokenizer", file=sys.stderr, flush=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it private; a checkpoint is ordinary data
    del tensors

    special = write_tokenizer(reader, source, out, hp["max_position_embeddings"])
    (out / "config.json").write_text(json.dumps(llama4_config(hp, special, tied, dtype), indent=2) + "\n")
    eos = [special["eos"]] if special["eos"] is not None else []
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    # ChatML models end a turn with <|im_end|> (usually the GGUF eos) and a document with
    # <|endoftext|>: stop on both.
    for extra in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        if extra in tokens and tokens.index(extra) not in eos:
            eos.append(tokens.index(extra))
    generation = {
        "bos_token_id": special["bos"],
        "eos_token_id": eos,
        "pad_token_id": special["pad"],
        # Greedy by default, as transformers does for a checkpoint without sampling settings
        # (SmolLM2's own generation_config has none): small models wander when sampled, e.g.
        # SmolLM2-135M starts "L..." instead of "The capital of France is Paris." 36% of the
        # time at temperature 0.2. Requests still choose their own temperature.
        "do_sample": False,
        "max_new_tokens": 512,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "herd_conversion.json").write_text(
        json.dumps(
            {
                "converter_version": CONVERTER_VERSION,
                "source": source.name,
                "source_bytes": source.stat().st_size,
                "dtype": dtype,
                "general.name": _field(reader, "general.name"),
                "file_type": _field(reader, "general.file_type"),
            },
            indent=2,
        )
        + "\n"
    )


# ------------------------------------------------------------------------------ CLI


def add_arguments(parser) -> None:
    """Arguments of `herd convert-gguf GGUF_FILE OUT_DIR`."""
    parser.add_argument("gguf_file", help="a dense Llama GGUF file (llama.cpp format)")
    parser.add_argument("out_dir", help="directory to write the Llama 4 text checkpoint into (replaced if present)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="weight dtype of the checkpoint (default float32: dequantized GGUF weights are exact in it)",
    )


def run(args) -> int:
    try:
        out = convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype, progress=True)
    except GGUFError as e:
        print(f"herd convert-gguf: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
