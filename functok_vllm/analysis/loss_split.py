"""Next-token loss split by (current token, next token) class over training checkpoints (memory consolidation).

Position t predicts token t+1 with cross-entropy loss; it falls into one of four groups by whether token t and token
t+1 are function tokens. Pairs that touch a document separator (EOS) are skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from functok_vllm.analysis.data import check_corpus, n_batches, sequences, token_stream
from functok_vllm.analysis.io import figure, out_dir, save_figure, write_csv, write_json
from functok_vllm.errors import CLIError

GROUPS = ("function->function", "function->content", "content->function", "content->content")


@dataclass
class LossSplitConfig:
    max_tokens: int | None = None  # None: the whole corpus
    seq_len: int = 256
    batch_size: int = 8

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("seq_len must be >= 2 and batch_size >= 1")


def group_of(cur: torch.Tensor, nxt: torch.Tensor, fn_mask: torch.Tensor) -> torch.Tensor:
    """(n,) current and next ids -> (n,) index into GROUPS."""
    return 2 * (~fn_mask[cur]).long() + (~fn_mask[nxt]).long()


def group_sums(ce: torch.Tensor, cur: torch.Tensor, nxt: torch.Tensor, fn_mask: torch.Tensor, skip_id: int = -1):
    """(4,) token counts and (4,) loss sums per group; pairs where either token is skip_id are left out."""
    keep = (cur != skip_id) & (nxt != skip_id)
    g = group_of(cur[keep], nxt[keep], fn_mask)
    return torch.bincount(g, minlength=4), torch.bincount(g, weights=ce[keep].double(), minlength=4)


def group_stats(counts: torch.Tensor, sums: torch.Tensor) -> dict:
    """Per group: tokens, share of tokens, mean loss, share of the total loss."""
    n, total = int(counts.sum()), float(sums.sum())
    return {
        name: {
            "tokens": int(counts[i]),
            "token_share": int(counts[i]) / n if n else 0.0,
            "mean_loss": float(sums[i]) / int(counts[i]) if counts[i] else None,
            "loss_share": float(sums[i]) / total if total else 0.0,
        }
        for i, name in enumerate(GROUPS)
    } | {"all": {"tokens": n, "mean_loss": total / n if n else None}}


def row_sums(ce: torch.Tensor, batch: torch.Tensor, fn_mask: torch.Tensor, skip_id: int = -1):
    """(b, 4) token counts and (b, 4) loss sums per group of each window (row) of a batch (b, seq) with its losses
    (b, seq - 1); pairs where either token is skip_id are left out."""
    cur, nxt = batch[:, :-1], batch[:, 1:]
    keep = ((cur != skip_id) & (nxt != skip_id)).flatten()
    row = torch.arange(batch.shape[0])[:, None].expand_as(cur).flatten()[keep]
    g = group_of(cur.flatten()[keep], nxt.flatten()[keep], fn_mask) + 4 * row
    n = 4 * batch.shape[0]
    counts = torch.bincount(g, minlength=n).view(-1, 4)
    sums = torch.bincount(g, weights=ce.flatten()[keep].double(), minlength=n).view(-1, 4)
    return counts, sums


@torch.no_grad()
def window_sums(am, stream: torch.Tensor, cfg: LossSplitConfig, desc: str = "loss split", progress: bool = True):
    """(windows, 4) token counts and loss sums per group, one row per window of the stream (the independent units of
    a bootstrap); the engine computes the losses (`am.token_losses`)."""
    counts, sums = [], []
    total = n_batches(stream, cfg.seq_len, cfg.batch_size)
    batches = sequences(stream, cfg.seq_len, cfg.batch_size)
    fn_mask = am.fn_mask.cpu()
    for batch, ce in am.token_losses(batches, total, progress, desc):  # (b, seq), (b, seq - 1)
        c, s = row_sums(ce, batch.cpu(), fn_mask, am.eos_id)
        counts.append(c)
        sums.append(s)
    return torch.cat(counts), torch.cat(sums)


def loss_split(am, stream: torch.Tensor, cfg: LossSplitConfig, desc: str = "loss split", progress: bool = True) -> dict:
    """Group counts and loss sums over the stream's windows, as `group_stats`."""
    counts, sums = window_sums(am, stream, cfg, desc, progress)
    return group_stats(counts.sum(0), sums.sum(0))


def step_of(name: str) -> int | None:
    """The training step a checkpoint directory's name carries (`step-00140`, Pythia's `step1000`,
    `checkpoint-500`): its last run of digits; None when it has none."""
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None


def discover_checkpoints(model_dir: str | Path) -> list[tuple[str, int | None, Path]]:
    """(label, step, path) of `checkpoints/step-*` under the model directory, then the final model itself."""
    d = Path(model_dir)
    found = []
    for p in sorted((d / "checkpoints").glob("step-*")):
        if (p / "config.json").is_file() and p.name.removeprefix("step-").isdigit():
            found.append((p.name, int(p.name.removeprefix("step-")), p))
    report = d / "training_report.json"
    step = json.loads(report.read_text()).get("config", {}).get("steps") if report.is_file() else None
    return sorted(found, key=lambda c: c[1]) + [("final", step, d)]


def over_checkpoints(
    am,
    checkpoints: list[tuple[str, int | None, Path]],
    stream: torch.Tensor,
    cfg: LossSplitConfig,
    open_model=None,
    am_dir: str | Path | None = None,
):
    """The loss split of each checkpoint on the same tokens; `am` supplies the tokenizer and function-token mask.
    `open_model(path)` gives a checkpoint's model (default: a float32 transformers model, or `am` itself for the
    checkpoint at `am_dir`, the model it was loaded from: no second load); each opened one is closed after."""
    from functok_vllm.analysis.model import HFAnalysisModel, load_checkpoint

    if open_model is None:
        own = Path(am_dir).resolve() if am_dir is not None else None

        def open_model(path):
            if own is not None and Path(path).resolve() == own:
                return am
            return HFAnalysisModel(load_checkpoint(path), am.tokenizer, {}, am.fn_mask)

    rows = []
    for label, step, path in checkpoints:
        ck = open_model(path)
        try:
            counts, sums = window_sums(ck, stream, cfg, desc=label)
            windows = {"counts": counts.tolist(), "sums": sums.tolist()}  # per window: the bootstrap's units
            rows.append({"checkpoint": label, "step": step, "groups": group_stats(counts.sum(0), sums.sum(0))})
            rows[-1]["windows"] = windows
        finally:
            if ck is not am:
                getattr(ck, "close", lambda: None)()
    return rows


def table_rows(results: list[dict]) -> list[dict]:
    return [
        {"checkpoint": r["checkpoint"], "step": r["step"], "group": g, **r["groups"][g]}
        for r in results
        for g in GROUPS
    ]


def plot(results: list[dict], path: Path) -> Path:
    fig, axes = figure(2, width=4.2)
    steps = [r["step"] if r["step"] is not None else i for i, r in enumerate(results)]
    for g in GROUPS:
        axes[0].plot(steps, [r["groups"][g]["mean_loss"] for r in results], marker="o", label=g)
        axes[1].plot(steps, [r["groups"][g]["loss_share"] for r in results], marker="o", label=g)
    axes[0].set_ylabel("mean next-token loss (nats)")
    axes[1].set_ylabel("share of total loss")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(args) -> int:
    from functok_vllm.analysis.model import check_model_dir, load_hf

    check_corpus(args.corpus)

    cfg = LossSplitConfig(args.max_tokens, args.seq_len, args.batch_size)
    if args.checkpoints:
        checkpoints = [(Path(p).name, step_of(Path(p).name), check_model_dir(p)) for p in args.checkpoints]
    else:
        checkpoints = discover_checkpoints(check_model_dir(args.model))
    if not checkpoints:
        raise CLIError("no checkpoints to evaluate")
    if getattr(args, "engine", "transformers") == "vllm":
        from functok_vllm.analysis.vllm_model import open_vllm
        from functok_vllm.engines.vllm.settings import offline_in_process

        tp = args.tensor_parallel_size
        offline_in_process(tp)
        am, open_model = open_vllm(args.model, args.function_tokens, tp)  # tokenizer + mask here, models in vLLM
    else:
        am, open_model = load_hf(args.model, None, args.function_tokens), None
    stream = token_stream(am.encode, am.eos_id, args.corpus, cfg.max_tokens)
    results = over_checkpoints(am, checkpoints, stream, cfg, open_model, am_dir=args.model)
    from functok_vllm.analysis import loss_dynamics

    trans = loss_dynamics.transitions(results)
    bigram = None
    if loss_dynamics.has_training_split():  # the bigram baseline: what text statistics alone give
        model = loss_dynamics.Bigram(loss_dynamics.training_documents(am.encode), am.vocab_size)
        bigram = loss_dynamics.bigram_split(am, stream, cfg, model)
    out = out_dir(args.out)
    paths = [
        write_json(out / "loss_split.json", results),
        write_csv(out / "loss_split.csv", table_rows(results)),
        plot(results, out / "loss_split.png"),
        loss_dynamics.plot(results, trans, bigram, out / "loss_dynamics.png"),
    ]
    (out / "loss_dynamics.md").write_text(loss_dynamics.markdown(results, trans, bigram, "loss_dynamics.png"))
    for t in trans:
        f = t["finding"]
        print(
            f"{f.name}: {f.statistic:.1%} of the reduction vs token share {f.null:.1%}, interval "
            f"[{f.interval[0]:.1%}, {f.interval[1]:.1%}]: {f.verdict}"
        )
    for r in results:
        shares = ", ".join(f"{g} {r['groups'][g]['loss_share']:.1%}" for g in GROUPS)
        print(f"{r['checkpoint']}: loss {r['groups']['all']['mean_loss']:.3f}; share of loss: {shares}")
    print("wrote " + ", ".join(map(str, paths)))
    return 0
