"""The transformers engine's sampler: one batched pass over a step's logits, and the log-probabilities it reports.

Order and meaning as in vLLM's V1 sampler: min_tokens (the end-of-sequence and stop token ids masked until a request
has that many tokens), then the penalties (repetition on prompt and output tokens, frequency and presence on output
tokens), then greedy rows take the argmax; sampled rows divide by their temperature, drop tokens under min_p times the
most likely one's probability, keep the top_k, then the smallest prefix reaching top_p, and draw with the request's
own generator (so a seed gives the same tokens whatever the batch mates). Every step is tensor ops over the rows that
asked for each thing; the only per-row Python is one uniform draw per sampled row (each request has its generator).

Log-probabilities are the log-softmax of the raw logits (temperature 1, no penalties), as OpenAI and vLLM's default
`raw_logprobs` report them: of the steered model when the request is steered, since the logits are.
"""

from __future__ import annotations

import torch

from functok_vllm.engines.base import SamplingParams, TokenLogprob


class PenaltyCounts:
    """Per-request output-token counts and prompt-token masks for the penalties, one row each, allocated on first use
    (a request without penalties never gets a row)."""

    def __init__(self, rows: int, vocab: int, device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self.counts: torch.Tensor | None = None  # (rows, vocab) int32
        self.in_prompt: torch.Tensor | None = None  # (rows, vocab) bool
        self.free = list(range(rows - 1, -1, -1))

    def join(self, prompt_ids: list[int]) -> int:
        if self.counts is None:
            self.counts = torch.zeros(self.rows, self.vocab, dtype=torch.int32, device=self.device)
            self.in_prompt = torch.zeros(self.rows, self.vocab, dtype=torch.bool, device=self.device)
        row = self.free.pop()
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        self.in_prompt[row, torch.tensor(prompt_ids, device=self.device)] = True
        return row

    def leave(self, row: int) -> None:
        if row >= 0:
            self.free.append(row)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators, n_out: list[int], pen_rows: list[int], ban, pens
) -> torch.Tensor:
    """(b, vocab) logits of b requests -> (b,) next tokens. `n_out[i]`: tokens row i has generated; `pen_rows[i]`: its
    PenaltyCounts row (-1: none); `ban[i]`: token ids min_tokens masks for it; `pens`: the PenaltyCounts."""
    b = logits.shape[0]
    dev = logits.device
    x = logits
    early = [i for i in range(b) if n_out[i] < params[i].min_tokens and ban[i]]
    pen = [i for i in range(b) if pen_rows[i] >= 0]
    if early or pen:
        x = logits.float().clone()
    if early:
        rows = torch.tensor([i for i in early for _ in ban[i]], device=dev)
        cols = torch.tensor([t for i in early for t in ban[i]], device=dev)
        x[rows, cols] = -torch.inf
    if pen:
        idx = torch.tensor(pen, device=dev)
        x[idx] = penalize(x[idx], [params[i] for i in pen], pens, torch.tensor([pen_rows[i] for i in pen], device=dev))
    tokens = x.argmax(-1)
    drawn = [i for i in range(b) if not params[i].greedy]
    if drawn:
        idx = torch.tensor(drawn, device=dev)
        tokens[idx] = draw(x[idx].float(), [params[i] for i in drawn], [generators[i] for i in drawn])
    if pen:
        rows = torch.tensor([pen_rows[i] for i in pen], device=dev)
        pens.counts.index_put_(
            (rows, tokens[torch.tensor(pen, device=dev)]), torch.ones_like(rows, dtype=torch.int32), accumulate=True
        )
    return tokens


def penalize(x: torch.Tensor, params: list[SamplingParams], pens: PenaltyCounts, rows: torch.Tensor) -> torch.Tensor:
    """(r, vocab) logits with vLLM's repetition, frequency and presence penalties applied."""
    f = lambda name: torch.tensor([getattr(p, name) for p in params], device=x.device)[:, None]  # noqa: E731
    counts = pens.counts[rows]  # (r, vocab)
    seen = counts > 0
    rep = torch.where(seen | pens.in_prompt[rows], f("repetition_penalty"), 1.0)
    x = torch.where(x > 0, x / rep, x * rep)
    return x - f("frequency_penalty") * counts - f("presence_penalty") * seen


def draw(x: torch.Tensor, params: list[SamplingParams], generators) -> torch.Tensor:
    """(r, vocab) penalised logits -> (r,) tokens drawn with each row's temperature, min_p, top_k, top_p, generator."""
    dev = x.device
    col = lambda vals: torch.tensor(vals, device=dev, dtype=torch.float32)[:, None]  # noqa: E731
    probs = torch.softmax(x / col([p.temperature for p in params]), dim=-1)  # (r, vocab)
    # Every row is drawn in descending order, filtered or not, so a row's token never depends on its batch mates.
    probs, order = probs.sort(dim=-1, descending=True)
    keep = probs >= col([p.min_p for p in params]) * probs[:, :1]  # min_p, against the most likely token
    rank = torch.arange(probs.shape[1], device=dev)[None, :]
    keep &= rank < col([p.top_k if p.top_k > 0 else probs.shape[1] for p in params])
    probs = probs * keep
    probs = probs / probs.sum(-1, keepdim=True)
    probs = probs * ((probs.cumsum(-1) - probs) < col([p.top_p for p in params]))  # the smallest prefix reaching top_p
    u = torch.cat([torch.rand(1, generator=g, device=dev) for g in generators])  # (r,) one draw per row
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=probs.shape[1] - 1)
    pick = torch.where(probs.gather(1, pick[:, None])[:, 0] > 0, pick, 0)  # never a dropped token (rounding)
    return order.gather(1, pick[:, None])[:, 0]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: list[int]) -> list[TokenLogprob]:
    """(r, vocab) raw logits, (r,) the tokens at those positions, `tops[i]` alternatives for row i -> one
    TokenLogprob per row (one host copy for all)."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, tokens[:, None].long())[:, 0].tolist()
    k = max(tops, default=0)
    if k == 0:
        return [TokenLogprob(int(t), c, ()) for t, c in zip(tokens.tolist(), chosen, strict=True)]
    top_v, top_i = lp.topk(k, dim=-1)
    out = []
    for t, c, vs, ids, n in zip(tokens.tolist(), chosen, top_v.tolist(), top_i.tolist(), tops, strict=True):
        out.append(TokenLogprob(int(t), c, tuple(zip(ids[:n], vs[:n], strict=True))))
    return out
