"""Prompt scoring (`echo` with `logprobs`) in chunks: every prompt token's log-probability without holding the
(prompt, vocab) logits, nor a second tensor of that size for their log-softmax.

The prefill runs with `HiddenTap` on the model's output head: a forward pre-hook that keeps the (n, d_model) hidden
states the head would read and lets the head compute only the last row (the one that predicts the first new token).
`prompt_logprobs` then applies the head to CHUNK rows at a time (with Gemma-2's final soft-capping where the config
has it, as its forward applies it), so a request holds (CHUNK, vocab) floats at most: for an 8,191-token SmolLM2
prompt, 2 x 50 MB instead of 2 x 1.6 GB.
"""

from __future__ import annotations

import torch

from functok_vllm.engines.base import TokenLogprob
from functok_vllm.engines.hf import sampling

CHUNK = 256  # prompt positions scored at once


class HiddenTap:
    """While entered: the output head's full input is kept in `hidden` (n, d_model) and only its last row computed."""

    def __init__(self, model):
        self.head = model.get_output_embeddings()
        self.hidden: torch.Tensor | None = None

    def __enter__(self) -> HiddenTap:
        self._handle = self.head.register_forward_pre_hook(self._tap)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _tap(self, _module, args):
        h = args[0]  # (1, n, d_model)
        self.hidden = h[0]
        return (h[:, -1:], *args[1:])


def prompt_logprobs(model, hidden: torch.Tensor, ids: torch.Tensor, top: int) -> list[TokenLogprob]:
    """The log-probability of ids[1:] (and `top` alternatives) from the (n, d_model) hidden states, CHUNK rows at
    a time; one TokenLogprob per position 1..n-1."""
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    n, out = ids.shape[0], []
    for i in range(0, n - 1, CHUNK):
        j = min(i + CHUNK, n - 1)
        logits = head(hidden[i:j])  # (rows, vocab)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out += sampling.token_logprobs(logits, ids[i + 1 : j + 1], [top] * (j - i))
    return out
