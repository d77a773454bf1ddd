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

    def __post_init__(self):
        if any(i < 0 for i in self.ids):
            raise ValueError("function token ids must be non-negative")

    @classmethod
    def load(cls, path: str | Path) -> FunctionTokens:
        d = json.loads(Path(path).read_text())
        toks = d["tokens"]
        return cls(
            [t["id"] for t in toks],
            [t["token"] for t in toks],
            {k: v for k, v in d.items() if k != "tokens"},
        )

    def mask(self, vocab_size: int, device=None) -> torch.Tensor:
        """(vocab_size,) bool lookup table: mask[input_ids] marks function-token positions with one gather."""
        outside = [i for i in self.ids if i >= vocab_size]
        if outside:
            raise ValueError(
                f"function token ids {outside[:5]} are outside this model's vocabulary of {vocab_size}: "
                "the function-token file was made with another tokenizer"
            )
        m = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        m[torch.tensor(self.ids, dtype=torch.long, device=device)] = True
        return m
