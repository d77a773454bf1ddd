"""Per-request text output: incremental detokenization and stop strings, one token at a time."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode yields for an incomplete UTF-8 sequence: wait for the next token
CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new one, so tokenizers that strip a leading space agree


class TextStream:
    """Turns a request's generated token ids into text deltas, holding back text that could still become a stop string.

    Each step decodes a short window (the previous chunk plus the new tokens) and keeps what the new tokens add, so a
    step costs the same however long the completion is (the offsets scheme of Hugging Face's TGI and vLLM).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), prompt_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may straddle this many emitted chars
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0  # start of the decode window
        self.read = len(self.ids)  # ids before this are already in self.text (or are prompt context)
        self.text = ""  # decoded so far (maybe cut at a stop string)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to send. Sets `stopped` when a stop string appears."""
        self.ids.append(token_id)
        old = self._decode(self.ids[self.prefix : self.read])
        new = self._decode(self.ids[self.prefix :])
        if len(new) <= len(old) or new.endswith(REPLACEMENT):
            return ""  # an incomplete character (or a special token): decide once more tokens arrive
        before = len(self.text)
        self.text += new[len(old) :]
        self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            start = max(before - self.hold, 0)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
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
