"""The grammar library (llguidance) fitted to a checkpoint's tokenizer, prepared once per model.

llguidance was chosen by measurement at the 202K Llama 4 vocabulary (benchmarks/RESULTS.md):
schemas compile in milliseconds whatever their bounds and a mask costs well under a millisecond
per row; xgrammar fills faster on simple grammars but spends seconds compiling a schema with
bounded strings (maxLength 20: 3.6 s, 40: 6.9 s) and tens of ms per step inside them. The price
is the vocabulary preparation, several seconds, paid once per model and process.
"""

from __future__ import annotations

import hashlib
import threading

import torch

_prepared: dict[tuple, "PreparedTokenizer"] = {}
_lock = threading.Lock()


class PreparedTokenizer:
    """llguidance's view of one vocabulary, and the tokens JSON output must never contain."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        # Tokens holding a raw control character (U+0000-U+001F). herd's JSON has no free
        # whitespace, so such a byte could only land inside a string, where JSON forbids it
        # unescaped (the grammar libraries' length-limited strings let it through).
        self.control_token_ids = torch.tensor(
            [i for i in range(vocab_size) if (text := self.tokenizer.decode_bytes([i])) and min(text) < 0x20],
            dtype=torch.long,
        )


def prepare_tokenizer(tokenizer, vocab_size: int, eos_ids) -> PreparedTokenizer:
    """The prepared vocabulary (built once per process for a given tokenizer and model)."""
    digest = hashlib.sha256(tokenizer.tokenizer_json.encode()).hexdigest()
    key = (digest, vocab_size, tuple(sorted(eos_ids)))
    with _lock:
        if key not in _prepared:
            _prepared[key] = PreparedTokenizer(tokenizer, vocab_size, eos_ids)
        return _prepared[key]
