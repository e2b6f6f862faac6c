"""Logprobs in the three shapes clients read.

- OpenAI chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}
- Together: {"tokens", "token_logprobs", "token_ids", "top_logprobs": [{token: logprob}]}
  (chat responses carry both side by side in one object)
- legacy completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} (+ token_ids)

The engine gives, per token, {token_id: logprob} holding the top-k and the chosen token.
"""

from __future__ import annotations

from functools import lru_cache


def _byte_decoder() -> dict[str, int]:
    # GPT-2 byte-level BPE alphabet (what Llama 4's tokenizer.json uses): printable char -> byte.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


class TokenText:
    """token id -> (display string, raw bytes), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lookup = lru_cache(maxsize=65536)(self._lookup)

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return "", []
        if self.tokenizer.is_special(token_id):
            return piece, list(piece.encode())
        if all(ch in _BYTES for ch in piece):
            raw = bytes(_BYTES[ch] for ch in piece)
        else:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "".join(f"\\x{b:02x}" for b in raw)
            text = f"bytes:{text}"
        return text, list(raw)

    def text(self, token_id: int) -> str:
        return self.lookup(token_id)[0]


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(
    texts: TokenText, token_ids: list[int], entries: list[dict[int, float]], k: int
) -> dict:
    """OpenAI's `content` list plus Together's parallel lists, for generated tokens."""
    content = []
    tokens, token_logprobs, top_logprobs = [], [], []
    for token_id, entry in zip(token_ids, entries):
        s, raw = texts.lookup(token_id)
        lp = _finite(entry.get(token_id))
        top = _top(entry, k)
        content.append(
            {
                "token": s,
                "logprob": lp,
                "bytes": raw,
                "top_logprobs": [
                    {"token": texts.text(t), "logprob": _finite(v), "bytes": texts.lookup(t)[1]} for t, v in top
                ],
            }
        )
        tokens.append(s)
        token_logprobs.append(lp)
        top_logprobs.append({texts.text(t): _finite(v) for t, v in top})
    return {
        "content": content,
        "refusal": None,
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "token_ids": list(token_ids),
        "top_logprobs": top_logprobs,
    }


def legacy_logprobs(
    texts: TokenText,
    token_ids: list[int],
    entries: list[dict[int, float] | None],
    k: int,
    text_offset: int = 0,
    specials_in_text: bool = True,
) -> dict:
    """The completions shape. An entry of None (the first prompt token) has no logprob.
    `specials_in_text=False`: special tokens (a BOS the server added) take no room in the text."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    at = text_offset
    for token_id, entry in zip(token_ids, entries):
        s = texts.text(token_id)
        tokens.append(s)
        offsets.append(at)
        if specials_in_text or not texts.tokenizer.is_special(token_id):
            at += len(s)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(_finite(entry.get(token_id)))
            top_logprobs.append({texts.text(t): _finite(v) for t, v in _top(entry, k)})
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
        "token_ids": list(token_ids),
    }


def merge_legacy(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def _finite(v: float | None) -> float | None:
    # JSON has no -inf: a token that was impossible gets a very small number instead.
    if v is None:
        return None
    return max(float(v), -9999.0)
