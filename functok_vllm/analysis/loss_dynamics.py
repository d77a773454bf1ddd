"""Loss split as learning dynamics: which (current, next) token category the loss *reduction* between consecutive
checkpoints comes from, beside a bigram model's loss per category (what text statistics alone give).

Between checkpoints a and b, category g's share of the reduction is (L_a[g] - L_b[g]) / (L_a - L_b), L the summed
next-token loss over the same held-out windows. The null is g's share of the tokens: what every token losing the same
amount would give. The hypothesis (learning concentrates on predicting content after function tokens) predicts
function->content above its token share. Intervals: bootstrap over windows, the same windows for both checkpoints.

The bigram baseline is fit on the training split of the shared corpus (documents the held-out split does not hold):
p(b | a) = (c(a, b) + BETA * u(b)) / (c(a) + BETA), u the add-one unigram distribution; its loss is computed on the
same (current, next) pairs as the model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from functok_vllm.analysis.data import n_batches, sequences
from functok_vllm.analysis.io import figure, save_figure
from functok_vllm.analysis.loss_split import GROUPS, LossSplitConfig, group_stats, row_sums
from functok_vllm.analysis.md import finding_cells, md_table, num
from functok_vllm.analysis.verdict import N_BOOT, finding

BETA = 1.0  # weight of the unigram prior of the bigram model, in pseudo-counts: unseen pairs keep a unigram share
MARGIN = 0.02  # the smallest excess of a reduction share over the token share worth a claim
FC = GROUPS.index("function->content")
BIGRAM_TOKENS = 2_000_000  # training tokens the bigram model counts (the whole training split of functok-tiny)


class Bigram:
    """A smoothed bigram model over token ids: counts of pairs within each document, kept sparse."""

    def __init__(self, ids: Iterator[list[int]], vocab: int, beta: float = BETA, max_tokens: int = BIGRAM_TOKENS):
        pairs, uni, n = [], torch.ones(vocab, dtype=torch.float64), 0  # add-one unigram counts
        for doc in ids:
            x = torch.tensor(doc, dtype=torch.long)
            uni += torch.bincount(x, minlength=vocab).double()
            pairs.append(x[:-1] * vocab + x[1:])
            n += len(doc)
            if n >= max_tokens:
                break
        keys, counts = torch.unique(torch.cat(pairs), return_counts=True)
        self.keys, self.counts = keys, counts.double()  # sorted pair keys a * vocab + b, and their counts
        self.ctx = torch.bincount(keys // vocab, weights=self.counts, minlength=vocab)  # (vocab,) c(a)
        self.uni = uni / uni.sum()
        self.vocab, self.beta, self.tokens = vocab, beta, n

    def nll(self, cur: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """(n,) -log p(nxt | cur)."""
        k = cur * self.vocab + nxt
        i = torch.searchsorted(self.keys, k).clamp(max=len(self.keys) - 1)
        c = torch.where(self.keys[i] == k, self.counts[i], 0.0)
        return -torch.log((c + self.beta * self.uni[nxt]) / (self.ctx[cur] + self.beta))

    def token_losses(self, batches, total=None, progress=False, desc="bigram"):
        """The same form as an analysis model's: (batch (b, seq), losses (b, seq - 1))."""
        for batch in batches:
            yield batch, self.nll(batch[:, :-1], batch[:, 1:]).float()


def has_training_split() -> bool:
    from functok_vllm.corpus import default_corpus_files

    return bool(default_corpus_files())


def training_documents(encode) -> Iterator[list[int]]:
    """Token ids of the training split (not held out) of the shared corpus, file after file."""
    from functok_vllm.corpus import default_corpus_files, is_heldout, iter_documents

    for path in default_corpus_files():
        for i, doc in enumerate(iter_documents(path)):
            if not is_heldout(i):
                yield encode(doc)


def bigram_split(am, stream: torch.Tensor, cfg: LossSplitConfig, bigram: Bigram) -> dict:
    """`group_stats` of the bigram model's losses on the windows the model's loss split reads."""
    counts = torch.zeros(4, dtype=torch.long)
    sums = torch.zeros(4, dtype=torch.float64)
    batches = sequences(stream, cfg.seq_len, cfg.batch_size)
    for batch, ce in bigram.token_losses(batches, n_batches(stream, cfg.seq_len, cfg.batch_size)):
        c, s = row_sums(ce, batch, am.fn_mask.cpu(), am.eos_id)
        counts += c.sum(0)
        sums += s.sum(0)
    return group_stats(counts, sums)


def reduction_shares(counts: np.ndarray, sums_a: np.ndarray, sums_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4,) shares of the loss reduction and (4,) token shares, from (windows, 4) counts and loss sums at two
    checkpoints; nan shares where the total loss did not fall."""
    drop = sums_a.sum(0) - sums_b.sum(0)  # (4,)
    tokens = counts.sum(0) / max(1, counts.sum())
    total = drop.sum()
    return (drop / total if total > 0 else np.full(4, np.nan)), tokens


def transitions(rows: list[dict], seed: int = 0) -> list[dict]:
    """Per pair of consecutive checkpoints: reduction shares per group, token shares, and the f->c finding."""
    out = []
    rng = np.random.default_rng(seed)
    for a, b in zip(rows, rows[1:], strict=False):
        counts = np.asarray(a["windows"]["counts"], dtype=float)
        sa, sb = np.asarray(a["windows"]["sums"]), np.asarray(b["windows"]["sums"])
        share, tokens = reduction_shares(counts, sa, sb)
        idx = rng.integers(0, len(counts), size=(N_BOOT, len(counts)))  # the same windows at both checkpoints
        boots = np.array([reduction_shares(counts[i], sa[i], sb[i])[0][FC] for i in idx])
        lo, hi = np.nanquantile(boots, [0.025, 0.975]) if np.isfinite(boots).any() else (np.nan, np.nan)
        f = finding(
            f"loss reduction f->c {a['checkpoint']}->{b['checkpoint']}",
            float(share[FC]),
            (float(lo), float(hi)),
            float(tokens[FC]),
            margin=MARGIN,
            what="function->content's share of the loss reduction between the checkpoints, against its "
            "share of the tokens",
        )
        out.append(
            {
                "from": a["checkpoint"],
                "to": b["checkpoint"],
                "shares": share.tolist(),
                "token_shares": tokens.tolist(),
                "finding": f,
            }
        )
    return out


def markdown(rows: list[dict], trans: list[dict], bigram: dict | None, figure_path="figures/loss_dynamics.png") -> str:
    """The loss-split section: mean loss per category by checkpoint beside the bigram model, and the reduction
    shares between consecutive checkpoints with the f->c finding."""
    lrows = [
        [r["checkpoint"], r["step"], num(r["groups"]["all"]["mean_loss"], True)]
        + [num(r["groups"][g]["mean_loss"], True) for g in GROUPS]
        for r in rows
    ]
    if bigram is not None:
        lrows.append(
            ["bigram baseline", "", num(bigram["all"]["mean_loss"], True)]
            + [num(bigram[g]["mean_loss"], True) for g in GROUPS]
        )
    text = (
        "## Loss split as learning dynamics\n\nMean next-token loss (nats) per (current, next) category on the same "
        "held-out windows; the bigram row is what text statistics alone give (a smoothed bigram model fit on the "
        "training split). Token shares: "
        + ", ".join(f"{g} {num(rows[-1]['groups'][g]['token_share'])}" for g in GROUPS)
        + ".\n\n"
        + md_table(["checkpoint", "step", "all", *GROUPS], lrows)
        + "\n"
    )
    if not trans:
        return text + "Only one checkpoint was given, so no loss reduction between checkpoints is measured.\n\n"
    trows = [[f"{t['from']} -> {t['to']}"] + [num(x) for x in t["shares"]] + finding_cells(t["finding"]) for t in trans]
    return (
        text
        + "Share of the loss reduction between consecutive checkpoints per category; the null for function->content "
        "is its share of the tokens (every token losing the same amount); interval: bootstrap over windows.\n\n"
        + md_table(["between", *GROUPS, "f->c share", "null (token share)", "95% interval", "verdict"], trows)
        + f"\n![loss dynamics]({figure_path})\n\n"
    )


def plot(rows: list[dict], trans: list[dict], bigram: dict | None, path: Path) -> Path:
    fig, axes = figure(2, width=4.4)
    steps = [r["step"] if r["step"] is not None else i for i, r in enumerate(rows)]
    for j, g in enumerate(GROUPS):
        axes[0].plot(steps, [r["groups"][g]["mean_loss"] for r in rows], marker="o", color=f"C{j}", label=g)
        if bigram is not None and bigram[g]["mean_loss"] is not None:
            axes[0].axhline(bigram[g]["mean_loss"], color=f"C{j}", ls="--", lw=0.8)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("mean loss, nats (dashed: bigram)")
    xs = np.arange(len(trans))
    for j, g in enumerate(GROUPS):
        x = xs + (j - 1.5) * 0.2
        axes[1].bar(x, np.nan_to_num([t["shares"][j] for t in trans]), 0.18, color=f"C{j}", label=g)
        tokens = [t["token_shares"][j] for t in trans]
        axes[1].scatter(x, tokens, color="black", marker="_", s=60, zorder=3, label="token share" if j == 0 else None)
    axes[1].set_xticks(xs, [f"{t['from']}->{t['to']}" for t in trans], fontsize=6)
    axes[1].set_ylabel("share of the loss reduction")
    for ax in axes:
        ax.legend(fontsize=6)
    return save_figure(fig, path)
