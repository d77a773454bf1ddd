"""Memory retrieval at function tokens: features re-activated from the context, and whether they predict the next token.

Definitions, per prompt, SAE layer and position p:
- active: SAE encoder output > 0 (JumpReLU threshold included).
- re-activated: active at p and active at an earlier position p' < p that holds a content (non-function) token.
- predictive: the feature's logit-lens vector U (g * W_dec[f]) (U the unembedding, g the final norm's weight) ranks
  the model's own next-token prediction at p (argmax of the logits) among its top K tokens, ties counted against it,
  K = max(1, round(top_frac * vocab)). A feature picked at random is predictive with probability about top_frac.
Counted positions: those with at least one earlier content-token position. Function-token positions are the subject;
content-token positions are scored the same way as a control.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from functok_vllm.analysis.data import check_prompt, read_prompts
from functok_vllm.analysis.io import figure, out_dir, save_figure, write_csv, write_json, write_jsonl
from functok_vllm.core.capture import encode_chunks, reactivated

KINDS = ("function", "content")
COUNTS = (
    "positions",
    "positions_active",
    "active",
    "reactivated",
    "predictive_reactivated",
    "predictive_other",
    "share_sum",
)


@dataclass
class ReactivationConfig:
    layers: tuple[int, ...] | None = None  # None: every layer with an SAE
    top_frac: float = 0.01
    detail: bool = True  # per-position feature lists in each prompt's result

    def __post_init__(self):
        if not 0 < self.top_frac <= 1:
            raise ValueError(f"top_frac must be in (0, 1], got {self.top_frac}")


def top_k(vocab_size: int, top_frac: float) -> int:
    return max(1, round(top_frac * vocab_size))


def predictive_pairs(
    directions: torch.Tensor, which: torch.Tensor, targets: torch.Tensor, unembed: torch.Tensor, k: int, chunk=1024
) -> torch.Tensor:
    """Pair i is (direction which[i], token targets[i]): is the token in the top k of that direction's logit lens,
    ties counted against it? directions (m, d_model), which and targets (n,) -> (n,) bool."""
    scores = directions @ unembed.t()  # (m, vocab), one row per distinct direction
    out = torch.empty(len(which), dtype=torch.bool, device=scores.device)
    for s in range(0, len(which), chunk):
        rows = scores[which[s : s + chunk]]  # (chunk, vocab)
        tgt = rows.gather(1, targets[s : s + chunk, None].to(rows.device))  # (chunk, 1)
        out[s : s + chunk] = (rows >= tgt).sum(1) - 1 < k
    return out


def _capture(sae, store: dict, layer: int):
    def fn(h):  # (tokens, d_model)
        store[layer] = torch.cat([a for _, a in encode_chunks(sae, h.to(sae.W_enc.dtype), active_only=True)])
        return None

    return fn


def _empty() -> dict:
    return {kind: dict.fromkeys(COUNTS, 0) for kind in KINDS}


def _rates(c: dict) -> dict:
    """Counts of one kind of position -> the three headline shares (None where nothing was counted).

    The re-activated share is the mean over positions with an active feature; predictive shares pool the features.
    """
    return {
        "reactivated_share": c["share_sum"] / c["positions_active"] if c["positions_active"] else None,
        "predictive_share_reactivated": c["predictive_reactivated"] / c["reactivated"] if c["reactivated"] else None,
        "predictive_share_other": (
            c["predictive_other"] / (c["active"] - c["reactivated"]) if c["active"] > c["reactivated"] else None
        ),
    }


@torch.no_grad()
def score_prompt(am, prompt: str, cfg: ReactivationConfig, unembed: torch.Tensor, where: str = "prompt") -> dict:
    ids = am.encode(prompt)
    check_prompt(ids, am.max_len, where)
    layers = list(cfg.layers) if cfg.layers is not None else sorted(am.saes)
    store: dict[int, torch.Tensor] = {}
    x = torch.tensor(ids, dtype=torch.long)
    logits = am.forward(x[None], {layer: _capture(am.saes[layer], store, layer) for layer in layers})[0]
    pred = logits.argmax(-1).tolist()  # (tokens,) the model's own next token at each position
    is_fn = am.fn_mask[x.to(am.fn_mask.device)].to(am.device)  # (tokens,)
    content_before = torch.cumsum((~is_fn).long(), 0) - (~is_fn).long() > 0  # (tokens,)
    k = top_k(am.vocab_size, cfg.top_frac)
    result = {"prompt": prompt, "n_tokens": len(ids), "k": k, "layers": {}, "positions": []}
    counted = content_before.nonzero().flatten()  # (n_pos,) positions with an earlier content token
    kind_of = (~is_fn[counted]).long()  # (n_pos,) 0: function, 1: content (KINDS order)
    for layer in layers:
        active = store[layer][counted]  # (n_pos, d_sae) bool
        re = reactivated(store[layer], is_fn)[counted]  # (n_pos, d_sae) bool
        row, feat = active.nonzero(as_tuple=True)  # active (position, feature) pairs
        uniq, inv = torch.unique(feat, return_inverse=True)
        tgt = torch.tensor(pred, device=counted.device)[counted[row]]
        pr = predictive_pairs(am.saes[layer].W_dec[uniq], inv, tgt, unembed, k)  # (pairs,)
        r = re[row, feat]  # (pairs,)
        n_act = torch.bincount(row, minlength=len(counted)).double()  # (n_pos,)
        n_re = torch.bincount(row, weights=r.double(), minlength=len(counted))  # (n_pos,)
        share = torch.where(n_act > 0, n_re / n_act.clamp(min=1), 0.0)  # (n_pos,)
        counts = {}
        for j, kind in enumerate(KINDS):
            m = kind_of == j
            pm = m[row]  # pairs at positions of this kind
            counts[kind] = {
                "positions": int(m.sum()),
                "positions_active": int((m & (n_act > 0)).sum()),
                "active": int(pm.sum()),
                "reactivated": int((pm & r).sum()),
                "predictive_reactivated": int((pm & r & pr).sum()),
                "predictive_other": int((pm & ~r & pr).sum()),
                "share_sum": float(share[m].sum()),
            }
        result["layers"][layer] = {kind: {**counts[kind], **_rates(counts[kind])} for kind in KINDS}
        if cfg.detail:
            for j in (kind_of == 0).nonzero().flatten().tolist():
                p, sel = int(counted[j]), row == j
                result["positions"].append(
                    {
                        "layer": layer,
                        "position": p,
                        "token": am.decode([ids[p]]),
                        "predicted_next": am.decode([pred[p]]),
                        "active": feat[sel].tolist(),
                        "reactivated": feat[sel & r].tolist(),
                        "predictive": feat[sel & pr].tolist(),
                    }
                )
    return result


def score_prompts(am, prompts: list[str], cfg: ReactivationConfig | None = None, progress: bool = False) -> list[dict]:
    """Per-prompt re-activation scores (see the module docstring); what `POST /v1/analysis/reactivation` returns."""
    from tqdm import tqdm

    cfg = cfg or ReactivationConfig()
    unembed = am.unembed()  # (vocab, d_model)
    it = tqdm(prompts, desc="reactivation", disable=not progress)
    return [score_prompt(am, p, cfg, unembed, f"prompt {i + 1}") for i, p in enumerate(it)]


def summarize(results: list[dict], top_frac: float | None = None) -> dict:
    """Counts pooled over prompts: {layer: {kind: counts + shares}}, plus the chance level of `predictive`."""
    out: dict = {}
    for r in results:
        for layer, kinds in r["layers"].items():
            acc = out.setdefault(layer, _empty())
            for kind in KINDS:
                for key in COUNTS:
                    acc[kind][key] += kinds[kind][key]
    table = {layer: {kind: {**c[kind], **_rates(c[kind])} for kind in KINDS} for layer, c in out.items()}
    k = results[0]["k"] if results else None
    return {"prompts": len(results), "k": k, "top_frac": top_frac, "layers": table}


def summary_rows(summary: dict) -> list[dict]:
    rows = []
    for layer, kinds in summary["layers"].items():
        for kind in KINDS:
            c = kinds[kind]
            rows.append({"layer": layer, "positions": kind, **{k: c[k] for k in c if k != "share_sum"}})
    return rows


def plot(summary: dict, path: Path) -> Path:
    fig, axes = figure(2, width=4.0)
    layers = list(summary["layers"])
    xs = torch.arange(len(layers), dtype=torch.float64)
    for j, kind in enumerate(KINDS):
        vals = [summary["layers"][layer][kind]["reactivated_share"] or 0.0 for layer in layers]
        axes[0].bar(xs + 0.4 * j - 0.2, vals, 0.4, label=f"{kind} positions")
    axes[0].set_title("active features re-activated")
    for j, key in enumerate(("predictive_share_reactivated", "predictive_share_other")):
        vals = [summary["layers"][layer]["function"][key] or 0.0 for layer in layers]
        axes[1].bar(xs + 0.4 * j - 0.2, vals, 0.4, label=key.removeprefix("predictive_share_").replace("other", "not"))
    if summary.get("top_frac"):
        axes[1].axhline(summary["top_frac"], color="gray", ls="--", lw=1, label="chance")
    axes[1].set_title("predictive share, function positions")
    for ax in axes:
        ax.set_xticks(xs.tolist(), [f"layer {layer}" for layer in layers])
        ax.set_ylim(0, 1.4 * ax.get_ylim()[1])  # room for the legend above the bars
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    return save_figure(fig, path)


def main(args) -> int:
    from functok_vllm.analysis.model import load_hf

    cfg = ReactivationConfig(tuple(args.layers) if args.layers else None, args.top_frac)
    prompts = read_prompts(args.prompts)
    am = load_hf(args.model, args.saes, args.function_tokens, cfg.layers and list(cfg.layers))
    results = score_prompts(am, prompts, cfg, progress=True)
    summary = summarize(results, cfg.top_frac)
    out = out_dir(args.out)
    paths = [
        write_jsonl(out / "reactivation.jsonl", results),
        write_json(out / "reactivation_summary.json", summary),
        write_csv(out / "reactivation_summary.csv", summary_rows(summary)),
        plot(summary, out / "reactivation.png"),
    ]
    for layer, kinds in summary["layers"].items():
        f = kinds["function"]
        print(
            f"layer {layer}: {f['reactivated_share'] or 0:.1%} of active features at function positions re-activated; "
            f"predictive {f['predictive_share_reactivated'] or 0:.1%} (re-activated) vs "
            f"{f['predictive_share_other'] or 0:.1%} (not), chance {cfg.top_frac:.1%}"
        )
    print("wrote " + ", ".join(map(str, paths)))
    return 0
