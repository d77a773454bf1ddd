"""Steering study, position-matched and controlled: a feature added at the last position when that position is a
function token against when it is a content token, beside a random direction of the same norm, over strengths.

Prompts: `ends_function`, each prompt as given (cut after a function word); `ends_content`, the same prompts cut
after their last content token. Both are steered at their LAST position only (the position every next-token
measure reads), so the two differ in what token sits there, not where it is. For each candidate feature (the
features whose logit lens tops on a whole content word; the target is that word) and each strength (a multiple of
the median residual norm at the layer: the added vector's norm), the feature direction and a random direction of
the same norm are added through the steering table. Per case: the change of log p(target) at the next position,
whether the target becomes top-1, KL(unsteered || steered), and fluency, the unsteered model's perplexity of the
greedy continuation the steered model writes (`GENERATE` tokens; the steer stays at the prompt's last position).
Findings (per strength): feature against the random direction (on `ends_function`), and function against content
position (feature direction), each paired by prompt with a bootstrap interval over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from functok_vllm.analysis.io import figure, save_figure
from functok_vllm.analysis.md import finding_cells, md_table, tok
from functok_vllm.analysis.reactivation_study import paired
from functok_vllm.analysis.steer_sweep import Steerer, kl, last_content_position
from functok_vllm.core import last_function_position
from functok_vllm.core.vector import Vector
from functok_vllm.engines.placement import residual_hooks
from functok_vllm.steering import FeatureEdit, SteeringSpec, VectorEdit

MULTIPLES = (0.25, 0.5, 1.0, 2.0)  # strengths in units of the median residual norm (the 0.25x..2x)
VERDICT_MULTIPLE = 1.0  # the strength whose findings are the headline: at 2x the text degenerates (KL of 8-11 nats)
GENERATE = 8  # continuation tokens for the fluency figure
MARGIN_LOGP = 0.1  # nats of log p(target): the smallest difference worth a claim
VARIANTS = ("ends_function", "ends_content")
DIRECTIONS = ("feature", "random")


@dataclass
class StudyConfig:
    layer: int
    prompts: int = 16
    features: int = 8
    multiples: tuple[float, ...] = MULTIPLES
    generate: int = GENERATE
    seed: int = 0


def median_residual_norm(am, prompts: list[str], layer: int) -> float:
    """The median, not the mean: a model with attention sinks (SmolLM2) has a first token 70x the others' norm at
    its middle layers, which would make a mean-based strength several times what an ordinary token carries."""
    norms = []

    def fn(h):  # (tokens, d_model)
        norms.append(h.float().norm(dim=-1))

    for p in prompts:
        am.forward(torch.tensor(am.encode(p))[None], {layer: fn}, logits=False)
    return float(torch.cat(norms).median())


def lens_candidates(am, layer: int, n: int) -> list[tuple[int, int]]:
    """(feature, target) for the n features whose logit lens has the largest top score on a whole content word."""
    scores = am.saes[layer].W_dec.to(am.device).float() @ am.unembed().t()  # (d_sae, vocab)
    best, top = scores.max(1)
    out = []
    for f in best.argsort(descending=True).tolist():
        t = int(top[f])
        word = am.decode([t])
        if not bool(am.fn_mask[t]) and word.startswith(" ") and word[1:].isalpha() and len(word) > 3:
            out.append((f, t))
        if len(out) == n:
            break
    return out


def variants(am, prompts: list[str], n: int) -> dict[str, list[torch.Tensor]]:
    """Up to n prompts whose last token is a function token and whose cut after the last content token keeps a
    function token before it, as the pair (ends_function, ends_content) of id tensors."""
    out = {v: [] for v in VARIANTS}
    for p in prompts:
        ids = torch.tensor(am.encode(p))
        if len(ids) < 3 or not bool(am.fn_mask[ids[-1]]):
            continue
        lc = last_content_position(ids, am.fn_mask)
        if lc < 2 or last_function_position(ids[: lc + 1], am.fn_mask) < 0:
            continue
        out["ends_function"].append(ids)
        out["ends_content"].append(ids[: lc + 1])
        if len(out["ends_function"]) == n:
            break
    return out


def add_spec(layer: int, feature: int, strength: float) -> SteeringSpec:
    """strength * W_dec[feature] added (where the caller's slot index puts it)."""
    return SteeringSpec(edits=(FeatureEdit(layer=layer, feature=feature, strength=strength),), positions="all")


def direction_spec(hook: str, layer: int, name: str, strength: float, direction: torch.Tensor) -> SteeringSpec:
    """strength * direction added at the layer's hook point, as a steering vector bound to its content."""
    vec = Vector.make({hook: direction})
    edit = VectorEdit(vector=name, strength=strength).bound(vec, {layer: direction})
    return SteeringSpec(edits=(edit,), positions="all")


def specs_for(layer: int, hook: str, cands, directions: dict, norm: float, w_norms, kind: str) -> list:
    """One spec per candidate: its decoder row scaled to norm `norm`, or its random direction of that norm."""
    if kind == "feature":
        return [add_spec(layer, f, norm / float(w_norms[f])) for f, _ in cands]
    return [direction_spec(hook, layer, f"random-{f}", norm, directions[f]) for f, _ in cands]


@torch.no_grad()
def steered_generate(st: Steerer, ids: torch.Tensor, specs: list, n_new: int, position: int = -1):
    """Each spec steers the prompt at `position` (default its last; one row each, one batch, KV cache for the new
    tokens, which are not steered): ((n, vocab) log-probs at the last prompt position, (n, n_new) greedy ids)."""
    am, n, t = st.am, len(specs), len(ids)
    slots = [st.table.acquire(s) for s in specs]
    try:
        idx = torch.zeros(n, t, dtype=torch.long, device=am.fn_mask.device)
        idx[:, position] = torch.tensor(slots)
        st.table.set_slot_index(idx.flatten())  # (n * tokens,) the hook's flattened order
        fns = {layer: (lambda h, op=op: h + op.delta(h)) for layer, op in st.table.layers.items()}
        points = {layer: am.saes[layer].cfg.hook for layer in st.table.layers}
        with residual_hooks(am.model, fns, points):
            out = am.model(input_ids=ids[None].expand(n, -1).to(am.device), use_cache=True, logits_to_keep=1)
            logp = out.logits[:, -1].float().log_softmax(-1)  # (n, vocab)
            st.table.set_slot_index(torch.zeros(n, dtype=torch.long, device=am.fn_mask.device))
            nxt, new = logp.argmax(-1), []
            for _ in range(n_new):
                new.append(nxt)
                out = am.model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1)
    finally:
        for s in specs:
            st.table.release(s)
    return logp, torch.stack(new, 1) if new else torch.zeros(n, 0, dtype=torch.long)


@torch.no_grad()
def perplexity(am, ids: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """(n,) the unsteered model's perplexity of each continuation row (n, k) after the prompt ids."""
    k = cont.shape[1]
    if k == 0:
        return torch.full((len(cont),), float("nan"))
    x = torch.cat([ids[None].expand(len(cont), -1), cont.to(ids.device)], 1).to(am.device)  # (n, t + k)
    logits = am.model(input_ids=x, logits_to_keep=k + 1).logits[:, :-1].float()  # (n, k, vocab): the unembedding
    logp = logits.log_softmax(-1)  # only where a continuation token is predicted (the costly part on a big vocab)
    nll = -logp.gather(2, cont[:, :, None].to(logp.device))[..., 0]  # (n, k)
    return nll.mean(1).exp().cpu()


def run(am, prompts: list[str], cfg: StudyConfig, progress: bool = False) -> dict:
    """Per prompt, variant, direction and strength: mean over candidate features of the four measures; findings."""
    from tqdm import tqdm

    layer = cfg.layer
    cands = lens_candidates(am, layer, cfg.features)
    if not cands:
        raise ValueError(f"no feature at layer {layer} has a whole content word as its top logit-lens token")
    pairs = variants(am, prompts, cfg.prompts)
    if len(pairs["ends_function"]) < 2:
        raise ValueError("the steering study needs at least two prompts ending on a function token")
    norm = median_residual_norm(am, prompts, layer)
    targets = torch.tensor([t for _, t in cands])
    W = am.saes[layer].W_dec.float()
    g = torch.Generator().manual_seed(cfg.seed)
    directions = {f: torch.nn.functional.normalize(torch.randn(W.shape[1], generator=g), dim=0) for f, _ in cands}
    st = Steerer(am, [layer])
    hook = am.saes[layer].cfg.hook.canonical().name  # where a random direction is added: the feature's own point
    n_p = len(pairs["ends_function"])
    shape = (n_p, len(VARIANTS), len(DIRECTIONS), len(cfg.multiples))
    m = {k: np.full(shape, np.nan) for k in ("dlogp", "top1", "kl", "ppl")}
    base_ppl = np.full((n_p, len(VARIANTS)), np.nan)
    bar = tqdm(total=n_p * len(VARIANTS), desc="steering study", disable=not progress)
    for i in range(n_p):
        for v, name in enumerate(VARIANTS):
            ids = pairs[name][i]
            base, cont = steered_generate(st, ids, [None], cfg.generate)
            base_ppl[i, v] = float(perplexity(am, ids, cont)[0])
            base = base[0]  # (vocab,)
            for d, kind in enumerate(DIRECTIONS):
                for s, mult in enumerate(cfg.multiples):
                    specs = specs_for(layer, hook, cands, directions, mult * norm, W.norm(dim=1), kind)
                    logp, cont = steered_generate(st, ids, specs, cfg.generate)  # (n, vocab), (n, k)
                    tgt = logp.gather(1, targets[:, None].to(logp.device))[:, 0]
                    m["dlogp"][i, v, d, s] = float((tgt - base[targets]).mean())
                    m["top1"][i, v, d, s] = float((logp.argmax(-1).cpu() == targets).double().mean())
                    m["kl"][i, v, d, s] = float(np.mean([kl(base, lp) for lp in logp]))
                    m["ppl"][i, v, d, s] = float(perplexity(am, ids, cont).mean())
            bar.update(1)
    bar.close()
    return {
        "layer": layer,
        "norm": norm,
        "multiples": list(cfg.multiples),
        "prompts": n_p,
        "features": cands,
        "feature_words": [(f, am.decode([t])) for f, t in cands],
        "generate": cfg.generate,
        "per_prompt": m,
        "base_ppl": base_ppl,
        "findings": findings(m, cfg.multiples, layer, cfg.seed),
    }


def findings(m: dict, multiples, layer: int, seed: int = 0) -> list:
    """Per strength: feature vs random direction (ends_function), function vs content last position (feature)."""
    out = []
    for s, mult in enumerate(multiples):
        out.append(
            paired(
                m["dlogp"][:, 0, 0, s],
                m["dlogp"][:, 0, 1, s],
                f"steer L{layer} {mult:g}x feature vs random",
                MARGIN_LOGP,
                "change of log p(target) when the feature is added at the last "
                "position (a function token), against a random direction of the same norm",
                seed,
            )
        )
        out.append(
            paired(
                m["dlogp"][:, 0, 0, s],
                m["dlogp"][:, 1, 0, s],
                f"steer L{layer} {mult:g}x function vs content",
                MARGIN_LOGP,
                "change of log p(target) when the feature is added at the last "
                "position, a function token, against the same prompts cut so that it is a content token",
                seed,
            )
        )
    return out


def table_rows(result: dict) -> list[list]:
    """Per variant, direction and strength: mean over prompts (95% bootstrap interval) of each measure."""
    from functok_vllm.analysis.verdict import bootstrap

    m, rows = result["per_prompt"], []
    for v, name in enumerate(VARIANTS):
        for d, kind in enumerate(DIRECTIONS):
            for s, mult in enumerate(result["multiples"]):
                cells = []
                for key, fmt in (("dlogp", "{:+.2f}"), ("top1", "{:.0%}"), ("kl", "{:.2f}"), ("ppl", "{:.1f}")):
                    x = m[key][:, v, d, s]
                    lo, hi = bootstrap(x[np.isfinite(x)])
                    cells.append(f"{fmt.format(np.nanmean(x))} [{fmt.format(lo)}, {fmt.format(hi)}]")
                rows.append([name, kind, f"{mult:g}x ({mult * result['norm']:.1f})", *cells])
    return rows


def markdown(result: dict, figure_path: str = "figures/steer_study.png") -> str:
    """The section of the report: the measures table, the unsteered fluency, and the findings with verdicts."""
    feats = ", ".join(f"{f}->{tok(w)}" for f, w in result["feature_words"][:8])
    base = np.nanmean(result["base_ppl"], 0)
    head = ["last position", "direction", "strength (norm)", "Δ log p(target)", "target top-1", "KL", "fluency (ppl)"]
    frows = [[f.name, *finding_cells(f, nats=True)] for f in result["findings"]]
    return (
        f"## Steering study, position-matched and controlled\n\nLayer {result['layer']}; {result['prompts']} prompts "
        f"as `ends_function` (last token a function token) and the same prompts cut after their last content token "
        "(`ends_content`), each steered at its last position only; candidate features (the first ones): "
        f"{feats}; target: the feature's top logit-lens word, at the next position. Strength: the norm of the added "
        f"vector, in multiples of the median residual norm {result['norm']:.1f}; `random`: a random direction of the "
        f"same norm. Fluency: the unsteered model's perplexity of the steered model's {result['generate']}-token "
        f"greedy continuation (unsteered: {base[0]:.1f} for ends_function, {base[1]:.1f} for ends_content). Cells: "
        "mean over prompts [95% bootstrap interval over prompts].\n\n"
        + md_table(head, table_rows(result))
        + f"\n![steering study]({figure_path})\n\nFindings (Δ log p(target), nats; interval: paired bootstrap over "
        "prompts):\n\n" + md_table(["finding", "statistic", "null", "95% interval", "verdict"], frows) + "\n"
    )


def plot(result: dict, path: Path) -> Path:
    """Δ log p(target) and fluency against strength, one line per (last position, direction)."""
    fig, axes = figure(2, width=4.4)
    m, xs = result["per_prompt"], result["multiples"]
    for v, name in enumerate(VARIANTS):
        for d, kind in enumerate(DIRECTIONS):
            style = dict(marker="o", ls="-" if kind == "feature" else "--", color=f"C{v}", label=f"{name}, {kind}")
            axes[0].plot(xs, np.nanmean(m["dlogp"][:, v, d], 0), **style)
            axes[1].plot(xs, np.nanmean(m["ppl"][:, v, d], 0), **style)
    for v in range(len(VARIANTS)):
        axes[1].axhline(np.nanmean(result["base_ppl"][:, v]), color=f"C{v}", lw=0.6, ls=":")
    axes[0].set_ylabel("Δ log p(target) at the next position")
    axes[1].set_ylabel("unsteered ppl of the continuation")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("strength (x median residual norm)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def to_json(result: dict) -> dict:
    """The result with arrays as lists and findings in `summary.json`'s form."""
    out = {k: v for k, v in result.items() if k not in ("per_prompt", "base_ppl", "findings")}
    out["per_prompt"] = {k: np.where(np.isfinite(v), v, None).tolist() for k, v in result["per_prompt"].items()}
    out["base_ppl"] = result["base_ppl"].tolist()
    out["findings"] = {f.name: f.to_json() for f in result["findings"]}
    return out


def main(args) -> int:
    from functok_vllm.analysis.data import read_prompts
    from functok_vllm.analysis.io import out_dir, write_json
    from functok_vllm.analysis.model import load_hf

    cfg = StudyConfig(args.layer, args.n_prompts, args.features, tuple(args.multiples), args.generate)
    prompts = read_prompts(args.prompts)
    am = load_hf(args.model, args.saes, args.function_tokens, [args.layer])
    try:
        result = run(am, prompts, cfg, progress=True)
    except ValueError as e:
        from functok_vllm.errors import CLIError

        raise CLIError(str(e)) from None
    out = out_dir(args.out)
    paths = [write_json(out / "steer_study.json", to_json(result)), plot(result, out / "steer_study.png")]
    (out / "steer_study.md").write_text(markdown(result, "steer_study.png"))
    for f in result["findings"]:
        print(
            f"{f.name}: {f.statistic:.3f} vs null {f.null:.3f}, interval [{f.interval[0]:.3f}, "
            f"{f.interval[1]:.3f}]: {f.verdict}"
        )
    print("wrote " + ", ".join(map(str, paths)) + f", {out / 'steer_study.md'}")
    return 0
