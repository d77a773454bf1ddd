"""Per-request text output: incremental detokenization and stop strings, one token at a time."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode yields for an incomplete UTF-8 sequence: wait for the next token
CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new one, so tokenizers that strip a leading space agree


class TextStream:
    """Turns a request's generated token ids into text deltas, holding back text that could still become a stop string.

    Each step decodes a short window (the previous chunk plus the new tokens) and keeps what the new tokens add, so a
    step costs the same however long the completion is (the offsets scheme of Hugging Face's TGI and vLLM).
    """

    def __init__(
        self,
        tokenizer,
        stop: tuple[str, ...] = (),
        prompt_ids: list[int] = (),
        skip_special_tokens: bool = True,
        include_stop: bool = False,  # keep the stop string in the text (vLLM's include_stop_str_in_output)
    ):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special, self.include_stop = skip_special_tokens, include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may straddle this many emitted chars
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0  # start of the decode window
        self.read = len(self.ids)  # ids before this are already in self.text (or are prompt context)
        self.text = ""  # decoded so far (maybe cut at a stop string)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def push(self, token_id: int, check_stop: bool = True) -> str:
        """Add one token; return the text that is now safe to send. Sets `stopped` when a stop string appears in
        the text this token adds (`check_stop` False: not yet, min_tokens has not been reached)."""
        self.ids.append(token_id)
        old = self._decode(self.ids[self.prefix : self.read])
        new = self._decode(self.ids[self.prefix :])
        if len(new) <= len(old) or new.endswith(REPLACEMENT):
            return ""  # an incomplete character (or a special token): decide once more tokens arrive
        before = len(self.text)
        self.text += new[len(old) :]
        self.prefix, self.read = self.read, len(self.ids)
        if self.stop and check_stop:
            start = max(before - self.hold, 0)
            hits = [(i, -len(s)) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:
                at, neg_len = min(hits)  # the first stop string; of two at one place, the longer
                self.text = self.text[: at - neg_len if self.include_stop else at]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self.hold
        if safe <= self.sent:
            return ""
        out = self.text[self.sent : safe]
        self.sent = safe
        return out

    def flush(self) -> str:
        """Everything not yet handed out (at the end of the request)."""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
