"""Re-activation with controls: within-prompt re-activation against a cross-prompt null, by firing frequency, and
whether re-activated features are predictive, measured causally by ablating them.

Per prompt and SAE layer, with attention sinks (`core/sinks.py`) left out of every count:
- counted positions: function-token positions with at least one earlier (non-sink) content-token position;
- within share: of the features active at a counted position p, the share also active at an earlier content position
  of the same prompt (the paper's "re-activated");
- cross-prompt null: the share active at the first c content positions of a *different* prompt (the next one in the
  list), c being how many content positions precede p. Dense features, features of common words and sink features
  are "re-activated" as often under this null, so only a share above it says the context is being recalled;
- strata: the same two shares restricted to features by how often they fire (share of non-sink positions of all
  prompts): rare, middle, dense (`STRATA` edges);
- causal effect: at the last counted position, a feature is ablated (clamped to 0 through the steering table, the
  engine's own edit) and the drop of the log-probability of the model's own next token there is measured;
  re-activated features are compared with the other features active at the same position.
Every interval is a bootstrap over prompts of the paired per-prompt difference, placed on the null.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from functok_vllm.analysis.data import check_prompt
from functok_vllm.analysis.io import figure, save_figure
from functok_vllm.analysis.md import finding_cells, md_table
from functok_vllm.analysis.steer_sweep import Steerer
from functok_vllm.analysis.verdict import Finding, bootstrap, finding
from functok_vllm.core.capture import reactivated
from functok_vllm.core.sinks import sink_mask
from functok_vllm.steering import FeatureEdit, SteeringSpec

STRATA = (0.01, 0.1)  # firing-rate edges: rare < 1% of positions <= middle < 10% <= dense
STRATUM_NAMES = ("rare", "middle", "dense")
MARGIN_SHARE = 0.02  # the smallest excess of re-activated share over the null worth a claim (2 points)
MARGIN_NATS = 0.01  # the smallest excess causal effect worth a claim (nats of next-token log-probability)


@dataclass
class StudyConfig:
    layers: tuple[int, ...] | None = None  # None: every layer with an SAE
    ablate: int = 8  # features ablated per prompt and layer, each of re-activated and other (drawn at random)
    seed: int = 0


def capture(am, ids: list[int], layers: list[int]) -> tuple[dict, dict, torch.Tensor]:
    """One forward: {layer: (tokens, d_sae) bool active}, {layer: (tokens,) residual norm}, (tokens, vocab) logits."""
    active, norms = {}, {}

    def fn(layer):
        def f(h):  # (tokens, d_model)
            sae = am.saes[layer]
            active[layer] = sae.active(h.to(sae.W_enc.dtype)).cpu()
            norms[layer] = h.float().norm(dim=-1).cpu()

        return f

    logits = am.forward(torch.tensor(ids)[None], {layer: fn(layer) for layer in layers})[0]
    return active, norms, logits


def prompt_record(active: torch.Tensor, is_fn: torch.Tensor, sinks: torch.Tensor) -> dict:
    """What one prompt at one layer contributes: active features at non-sink positions, and the content sets."""
    active = active & ~sinks[:, None]  # (tokens, d_sae) sinks carry no context
    content = ~is_fn & ~sinks  # (tokens,)
    n_before = torch.cumsum(content.long(), 0) - content.long()  # (tokens,) content positions before each
    counted = is_fn & ~sinks & (n_before > 0)
    seen = active[content].int().cummax(0).values.bool() if content.any() else active[:0]  # (n_content, d_sae)
    return {
        "active": active,
        "content": content,
        "is_fn": is_fn,
        "sinks": sinks,
        "counted": counted,
        "n_before": n_before,
        "seen": seen,
    }


def shares(rec: dict, other: dict, masks: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """{stratum: (within share, cross-prompt share)} of one prompt, each the mean over its counted positions that have
    an active feature in that stratum (nan, nan where none has)."""
    pos = rec["counted"].nonzero().flatten()
    act = rec["active"][pos]  # (n_pos, d_sae)
    within = reactivated(rec["active"], ~rec["content"])[pos]  # (n_pos, d_sae) active earlier at a content position
    if len(other["seen"]):
        k = (rec["n_before"][pos].clamp(max=len(other["seen"])) - 1).long()  # (n_pos,)
        cross = act & other["seen"][k]
    else:
        cross = torch.zeros_like(act)
    out = {}
    for name, m in masks.items():
        a = (act & m).sum(1).double()  # (n_pos,)
        keep = a > 0
        if not keep.any():
            out[name] = (float("nan"), float("nan"))
            continue
        w = ((within & m).sum(1)[keep] / a[keep]).mean()
        c = ((cross & m).sum(1)[keep] / a[keep]).mean()
        out[name] = (float(w), float(c))
    return out


def strata_masks(records: list[dict], d_sae: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Feature masks by firing rate over the non-sink positions of all prompts, and the rates (d_sae,)."""
    fired = torch.zeros(d_sae, dtype=torch.float64)
    for r in records:
        fired += r["active"].sum(0).double()
    rate = fired / max(1, sum(int((~r["sinks"]).sum()) for r in records))
    lo, hi = STRATA
    masks = {"all": torch.ones(d_sae, dtype=torch.bool), "rare": rate < lo, "middle": (rate >= lo) & (rate < hi)}
    masks["dense"] = rate >= hi
    return masks, rate


def paired(stat: np.ndarray, null: np.ndarray, name: str, margin: float, what: str, seed: int = 0) -> Finding:
    """A finding from per-prompt values of a statistic and its null: the means, and the bootstrap interval of the
    paired difference placed on the null's mean. Prompts where either is undefined are left out."""
    keep = np.isfinite(stat) & np.isfinite(null)
    s, z = stat[keep], null[keep]
    if len(s) == 0:
        return finding(name, float("nan"), (float("nan"),) * 2, float("nan"), what=what)
    lo, hi = bootstrap(s - z, seed=seed)
    m_null = float(z.mean())
    return finding(name, float(s.mean()), (m_null + lo, m_null + hi), m_null, margin=margin, what=what)


def within_cross(records: list[dict], masks: dict) -> dict[str, np.ndarray]:
    """{stratum: (prompts, 2) array of (within, cross) shares}; prompt i's null is prompt i + 1 (wrapping)."""
    n = len(records)
    per = [shares(records[i], records[(i + 1) % n], masks) for i in range(n)]
    return {name: np.array([p[name] for p in per], dtype=float) for name in masks}


@torch.no_grad()
def ablation_drops(st: Steerer, ids: list[int], layer: int, p: int, feats: list[int], base, target: int):
    """(n,) drop of log p(target) at position p when each feature is ablated (clamped to 0) at p alone, one batch;
    `base`: the unsteered (vocab,) log-probabilities at p."""
    specs = [
        SteeringSpec(edits=(FeatureEdit(layer=layer, feature=int(f), mode="ablate"),), positions="all") for f in feats
    ]
    x = torch.tensor(ids[: p + 1])  # causal: the logits at p read no later token
    lp = st.logits_at(x, specs, [p] * len(specs))[:, p].log_softmax(-1)  # (n, vocab)
    return base[target] - lp[:, target]


@torch.no_grad()
def causal_effects(am, st: Steerer, ids: list[int], layer: int, rec: dict, logits, cfg: StudyConfig, rng):
    """(mean drop of log p(own next token) when ablating re-activated features, same for the other active ones) at
    the last counted position, `cfg.ablate` features of each drawn at random; nan where a group is empty."""
    pos = rec["counted"].nonzero().flatten()
    if not len(pos):
        return float("nan"), float("nan")
    p = int(pos[-1])
    re = reactivated(rec["active"], ~rec["content"])[p]  # (d_sae,)
    act = rec["active"][p]
    base = logits[p].log_softmax(-1)  # (vocab,)
    target = int(base.argmax())
    out = []
    for group in (act & re, act & ~re):
        feats = group.nonzero().flatten().numpy()
        if not len(feats):
            out.append(float("nan"))
            continue
        feats = rng.choice(feats, size=min(cfg.ablate, len(feats)), replace=False)
        out.append(float(ablation_drops(st, ids, layer, p, feats.tolist(), base, target).mean()))
    return tuple(out)


def run(am, prompts: list[str], cfg: StudyConfig | None = None, progress: bool = False) -> dict:
    """Per-layer within/cross shares by stratum and causal effects, per prompt, and the findings."""
    from tqdm import tqdm

    cfg = cfg or StudyConfig()
    if len(prompts) < 2:
        raise ValueError("the cross-prompt null needs at least two prompts")
    layers = list(cfg.layers) if cfg.layers is not None else sorted(am.saes)
    bos = getattr(getattr(am, "tokenizer", None), "bos_token_id", None)
    st = Steerer(am, layers, max_clamps=cfg.ablate)
    rng = np.random.default_rng(cfg.seed)
    records = {layer: [] for layer in layers}
    effects = {layer: [] for layer in layers}
    for i, prompt in enumerate(tqdm(prompts, desc="re-activation", disable=not progress)):
        ids = am.encode(prompt)
        check_prompt(ids, am.max_len, f"prompt {i + 1}")
        active, norms, logits = capture(am, ids, layers)
        x = torch.tensor(ids)
        is_fn = am.fn_mask.cpu()[x]
        for layer in layers:
            rec = prompt_record(active[layer], is_fn, sink_mask(x, norms[layer], bos))
            records[layer].append(rec)
            effects[layer].append(causal_effects(am, st, ids, layer, rec, logits, cfg, rng))
    out = {"prompts": len(prompts), "layers": {}, "findings": []}
    for layer in layers:
        masks, rate = strata_masks(records[layer], am.saes[layer].d_sae)
        wc = within_cross(records[layer], masks)
        eff = np.array(effects[layer], dtype=float)  # (prompts, 2)
        row = {"features": {k: int(m.sum()) for k, m in masks.items()}}
        row["sinks"] = sum(int(r["sinks"].sum()) for r in records[layer])
        row["positions"] = sum(int(r["counted"].sum()) for r in records[layer])
        for name in masks:
            f = paired(
                wc[name][:, 0],
                wc[name][:, 1],
                f"reactivation L{layer} {name}",
                MARGIN_SHARE,
                "share of active features at function positions also active earlier at a content position "
                "of the same prompt, against the same share for a different prompt",
                cfg.seed,
            )
            row[name] = f
            out["findings"].append(f)
        c = paired(
            eff[:, 0],
            eff[:, 1],
            f"causal L{layer}",
            MARGIN_NATS,
            "drop of log p(own next token) when a re-activated feature is ablated at the last function "
            "position, against ablating another feature active there",
            cfg.seed,
        )
        row["causal"] = c
        out["findings"].append(c)
        out["layers"][layer] = row
    return out


def plot(result: dict, path: Path) -> Path:
    """Within-prompt share (bars, paired 95% interval) beside the cross-prompt null (dashes) by stratum, and the
    causal effect of ablating re-activated features beside other active ones, per layer."""
    fig, axes = figure(2, width=4.4)
    layers = list(result["layers"])
    names = ("all", *STRATUM_NAMES)
    width = 0.8 / len(layers)
    for j, layer in enumerate(layers):
        fs = [result["layers"][layer][n] for n in names]
        xs = np.arange(len(names)) + j * width
        axes[0].bar(xs, [f.statistic for f in fs], width * 0.9, yerr=_err(fs), label=f"layer {layer}")
        axes[0].scatter(xs, [f.null for f in fs], color="black", marker="_", s=120, zorder=3)
    axes[0].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    axes[0].set_ylabel("share of active features re-activated")
    axes[0].set_title("bars: same prompt; dashes: another prompt", fontsize=8)
    cs = [result["layers"][layer]["causal"] for layer in layers]
    xs = np.arange(len(layers))
    axes[1].errorbar(xs - 0.1, [c.statistic for c in cs], yerr=_err(cs), fmt="o", label="re-activated")
    axes[1].scatter(xs + 0.1, [c.null for c in cs], color="black", marker="s", label="other active")
    axes[1].set_xticks(xs, [f"layer {layer}" for layer in layers])
    axes[1].set_ylabel("drop of log p(own next token), nats")
    axes[1].axhline(0, color="gray", lw=0.5)
    for ax in axes:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _err(fs: list[Finding]) -> np.ndarray:
    """(2, n) error bars of findings' intervals around their statistics (0 where undefined)."""
    e = np.array([[f.statistic - f.interval[0], f.interval[1] - f.statistic] for f in fs], dtype=float).T
    return np.nan_to_num(e).clip(min=0)


def markdown(result: dict, figure_path: str = "figures/reactivation_study.png") -> str:
    """The section of the report: per layer and stratum, the statistic beside its null, interval and verdict."""
    rows = []
    for layer, row in result["layers"].items():
        for name in ("all", *STRATUM_NAMES, "causal"):
            f = row[name]
            n = row["features"].get(name, "")
            rows.append([layer, name, n, *finding_cells(f, nats=name == "causal")])
    head = ["layer", "features (stratum)", "n", "statistic", "null", "95% interval", "verdict"]
    lo, hi = STRATA
    return (
        f"## Re-activation with controls\n\n{result['prompts']} prompts; attention sinks left out "
        "(`core/sinks.py`: first position, BOS, residual norm > 10x the sequence median). Statistic: the share of "
        "features active at a function position that were active at an earlier content position of the same prompt; "
        "null: the same share against the first as many content positions of another prompt (a feature that fires "
        "often is 're-activated' under both). Strata by firing rate over non-sink positions: rare < "
        f"{lo:.0%}, middle, dense >= {hi:.0%}. *causal*: at the last function position, the drop of the "
        "log-probability of the model's own next token when a re-activated feature is ablated there (through the "
        "steering table), against ablating another active feature; nats. Intervals: bootstrap over prompts of the "
        "paired difference, placed on the null (so it can pass 100% near the ceiling). The null controls "
        "frequency, not distance: features that persist over neighbouring "
        "positions also count as re-activated within a prompt.\n\n"
        + md_table(head, rows)
        + f"\n![re-activation]({figure_path})\n\n"
    )


def to_json(result: dict) -> dict:
    """Findings in `summary.json`'s form, by layer, with the stratum sizes."""
    layers = {}
    for layer, row in result["layers"].items():
        layers[layer] = {k: (v.to_json() if isinstance(v, Finding) else v) for k, v in row.items()}
    return {"prompts": result["prompts"], "layers": layers}


def main(args) -> int:
    from functok_vllm.analysis.data import read_prompts
    from functok_vllm.analysis.io import out_dir, write_json
    from functok_vllm.analysis.model import load_hf
    from functok_vllm.errors import CLIError

    cfg = StudyConfig(tuple(args.layers) if args.layers else None, args.ablate)
    prompts = read_prompts(args.prompts)
    if len(prompts) < 2:
        raise CLIError("the cross-prompt null needs at least two prompts")
    am = load_hf(args.model, args.saes, args.function_tokens, cfg.layers and list(cfg.layers))
    result = run(am, prompts, cfg, progress=True)
    out = out_dir(args.out)
    paths = [write_json(out / "reactivation_study.json", to_json(result)), plot(result, out / "reactivation_study.png")]
    (out / "reactivation_study.md").write_text(markdown(result, "reactivation_study.png"))
    for f in result["findings"]:
        print(
            f"{f.name}: {f.statistic:.4f} vs null {f.null:.4f}, interval [{f.interval[0]:.4f}, "
            f"{f.interval[1]:.4f}]: {f.verdict}"
        )
    print("wrote " + ", ".join(map(str, paths)) + f", {out / 'reactivation_study.md'}")
    return 0
