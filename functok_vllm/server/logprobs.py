"""Log-probabilities in OpenAI's two response formats, from the engines' `TokenLogprob`s.

- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}`,
  exactly `top_logprobs` alternatives per token;
- completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where each `top_logprobs` entry maps
  token strings to log-probabilities: the `logprobs` most likely, plus the chosen token (so up to logprobs + 1, as
  OpenAI and vLLM); with `echo` the prompt's tokens come first, the first one's entries null.

A token's string is its own text; a token that is not a whole UTF-8 character (byte-level BPE splits them) is shown as
OpenAI shows it, `bytes:\\xe2\\x80`, and `bytes` always holds its raw bytes. A log-probability of -inf is written
-9999.0 and a NaN one null (`finite.logprob`).
"""

from __future__ import annotations

import re
from functools import lru_cache

from functok_vllm.engines.base import TokenLogprob
from functok_vllm.server.finite import logprob as shown

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte-fallback tokens


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenText:
    """Each token id's raw bytes and display string for one tokenizer (cached: a vocabulary is small)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.special = set(getattr(tokenizer, "all_special_ids", ()))
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """(display string, raw bytes)."""
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._make(token_id)
        return hit

    def _make(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        raw = None
        if token_id not in self.special and isinstance(piece, str):
            if self.byte_level and all(c in _byte_decoder() for c in piece):
                raw = bytes(_byte_decoder()[c] for c in piece)
            elif m := BYTE_TOKEN.fullmatch(piece):
                raw = bytes([int(m.group(1), 16)])
        if raw is None:
            text = self.tokenizer.decode([token_id])
            return text, list(text.encode())
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def chat_logprobs(lps: list[TokenLogprob], tt: TokenText) -> dict:
    def one(token: int, logprob: float) -> dict:
        text, raw = tt.get(token)
        return {"token": text, "logprob": shown(logprob), "bytes": raw}

    return {"content": [one(t.token, t.logprob) | {"top_logprobs": [one(i, v) for i, v in t.top]} for t in lps]}


def completion_logprobs(lps: list[TokenLogprob | None], tt: TokenText, offset: int = 0) -> dict:
    """The completions format of `lps` (None: a position without log-probabilities, the first prompt token, whose
    token string the caller fills in), text offsets starting at `offset` (the length of the text before them)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in lps:
        if t is None:
            out["tokens"].append(None)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["tokens"].append(tt.text(t.token))
            out["token_logprobs"].append(shown(t.logprob))
            top = {tt.text(i): shown(v) for i, v in t.top}
            top.setdefault(tt.text(t.token), shown(t.logprob))
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(out["tokens"][-1] or "")
    return out


def echo_logprobs(
    prompt_ids: list[int], prompt_lps: list[TokenLogprob | None], lps: list[TokenLogprob], tt: TokenText
) -> dict:
    """Completions logprobs with `echo`: the prompt's tokens (the first without a log-probability) then the
    completion's, offsets over the prompt's text followed by the completion's."""
    out = completion_logprobs([*prompt_lps, *lps], tt)
    if prompt_ids:  # the first prompt token has no TokenLogprob: name it, and shift the offsets after it
        first = tt.text(prompt_ids[0])
        out["tokens"][0] = first
        out["text_offset"] = [0] + [o + len(first) for o in out["text_offset"][1:]]
    return out
