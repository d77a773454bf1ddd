"""Function-token sets: load the JSON that `functok function-tokens` writes and test membership by table lookup."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class FunctionTokens:
    ids: list[int]
    strings: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # what `functok function-tokens` recorded: coverage, corpus, tokenizer
    source: Path | None = None  # the file it was loaded from, named in errors

    def __post_init__(self):
        if any(i < 0 for i in self.ids):
            raise ValueError("function token ids must be non-negative")

    @classmethod
    def load(cls, path: str | Path) -> FunctionTokens:
        """ValueError with a one-line message naming the file and the field unless it is the JSON
        `{"tokens": [{"id": int >= 0, "token": str, ...}, ...], ...}`."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:  # missing, unreadable, not UTF-8, not JSON
            raise ValueError(f"function-token file {p}: cannot be read as JSON ({e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
            raise ValueError(f"function-token file {p}: tokens: missing (expected an object with a 'tokens' list)")
        for i, t in enumerate(d["tokens"]):
            where = f"function-token file {p}: tokens[{i}]"
            if not isinstance(t, dict):
                raise ValueError(f"{where}: must be an object with 'id' and 'token', got {type(t).__name__}")
            for key, kind in (("id", int), ("token", str)):
                v = t.get(key)
                if key not in t:
                    raise ValueError(f"{where}.{key}: missing")
                if isinstance(v, bool) or not isinstance(v, kind) or (kind is int and v < 0):
                    want = "a non-negative integer" if kind is int else "a string"
                    raise ValueError(f"{where}.{key}: must be {want}, got {v!r}")
        toks = d["tokens"]
        meta = {k: v for k, v in d.items() if k != "tokens"}
        return cls([t["id"] for t in toks], [t["token"] for t in toks], meta, p)

    def mask(self, vocab_size: int, device=None) -> torch.Tensor:
        """(vocab_size,) bool lookup table: mask[input_ids] marks function-token positions with one gather."""
        outside = [i for i in self.ids if i >= vocab_size]
        if outside:
            named = f"function-token file {self.source}: " if self.source else ""
            raise ValueError(
                f"{named}function token ids {outside[:5]} are outside this model's vocabulary of {vocab_size}: "
                "the function-token file was made with another tokenizer"
            )
        m = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        m[torch.tensor(self.ids, dtype=torch.long, device=device)] = True
        return m
