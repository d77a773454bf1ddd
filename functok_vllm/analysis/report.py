"""`functok analyze report`: regenerate a model's REPORT.md and figures (analysis/ for the demo model, else
analysis/MODEL_NAME/).

Every number in the report comes from this run, and every sentence that compares with the paper is chosen by a
condition on those numbers or generated from a `Finding`'s verdict. The report is a list of `SECTIONS`, each
`run(am, ctx) -> result` (stored as ctx[name]; a result's "findings", {finding: {layer: Finding}}, go into
summary.json) and `markdown(result, ctx) -> (text, verdict sentences)`: a new analysis joins the report by adding a
Section. `--corpus FILE...` runs it on any text (default: the held-out split of the shared corpus).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from functok_vllm.analysis import coverage, loss_split, reactivation, render, render_findings, steer_sweep
from functok_vllm.analysis.data import check_corpus, corpus_documents, read_prompts, token_stream
from functok_vllm.analysis.features import FeaturesConfig, top_contexts
from functok_vllm.analysis.io import out_dir, write_jsonl
from functok_vllm.core import last_function_position
from functok_vllm.paths import ANALYSIS_DIR, DEMO_MODEL, ROOT

N_PROMPTS = 30
STEER_PROMPTS = 8  # prompts of the steering study
STEER_FEATURES = 16  # candidate features of the steering study
NORM_MULTIPLES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # sweep strengths, in units of the median residual norm
STUDY_MULTIPLE = 2.0  # strength of the steering study and of the shown continuations


def rel(path) -> str:
    """A path as the report shows it: relative to the repository when inside it (the same on every machine)."""
    p = Path(path).resolve()
    if p.is_relative_to(ROOT):
        return str(p.relative_to(ROOT))
    return "~/" + str(p.relative_to(Path.home())) if p.is_relative_to(Path.home()) else str(p)


def sae_tokens(saes: Path) -> int | None:
    """How many tokens the SAEs were trained on, where this project trained them (`training_report.json`)."""
    report = saes / "training_report.json"
    return json.loads(report.read_text()).get("trained_tokens") if report.is_file() else None


def make_prompts(am, n: int = N_PROMPTS, max_tokens: int = 40, min_cut: int = 10, corpus=None) -> list[str]:
    """Paragraph openings (held-out, or of --corpus) cut right after their last function word (an alphabetic function
    token) within the first max_tokens tokens, so each prompt asks for the content word that follows."""
    prompts = []
    for doc in corpus_documents(corpus):
        ids = am.encode(doc)[:max_tokens]
        words = [i for i, t in enumerate(ids) if bool(am.fn_mask[t]) and am.decode([t]).strip().isalpha()]
        if not words or words[-1] + 1 < min_cut:
            continue
        text = am.decode(ids[: words[-1] + 1]).strip()
        if text not in prompts:
            prompts.append(text)
        if len(prompts) == n:
            break
    return prompts


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
    scores = am.saes[layer].W_dec.to(am.device) @ am.unembed().t()  # (d_sae, vocab)
    best, tok = scores.max(1)
    out = []
    for f in best.argsort(descending=True).tolist():
        t = int(tok[f])
        word = am.decode([t])
        if not bool(am.fn_mask[t]) and word.startswith(" ") and word[1:].isalpha() and len(word) > 3:
            out.append((f, t))
        if len(out) == n:
            break
    return out


def steering_study(am, prompts: list[str], layer: int, strength: float) -> dict:
    """Target top-1 rate, target probability and KL per policy, for prompts ending on a function token (variant
    `ends_function`) and the same prompts cut after their last content token (`ends_content`). Each prompt runs
    once per policy with every candidate feature in one batch, one steering slot per row."""
    from tqdm import tqdm

    st = steer_sweep.Steerer(am, [layer])
    cands = lens_candidates(am, layer, STEER_FEATURES)
    targets = torch.tensor([t for _, t in cands])
    variants = {"ends_function": [], "ends_content": []}
    for p in prompts[:STEER_PROMPTS]:
        ids = torch.tensor(am.encode(p))
        variants["ends_function"].append(ids)
        lc = steer_sweep.last_content_position(ids, am.fn_mask)
        if last_function_position(ids[: lc + 1], am.fn_mask) >= 0:
            variants["ends_content"].append(ids[: lc + 1])
    out, best = {}, None
    bar = tqdm(total=sum(map(len, variants.values())), desc="steering study")
    for name, seqs in variants.items():
        acc = {pol: {"top1": 0.0, "target_prob": 0.0, "kl": 0.0} for pol in steer_sweep.POLICIES}
        base_prob = 0.0
        for i, ids in enumerate(seqs):
            base = st.logits(ids, None, "all", len(ids))[-1].log_softmax(-1)  # (vocab,)
            base_prob += float(base[targets].exp().sum())
            for pol in steer_sweep.POLICIES:
                specs = [steer_sweep.spec_for(layer, f, strength, pol) for f, _ in cands]
                logp = st.logits_many(ids, specs, pol, len(ids))[:, -1].log_softmax(-1)  # (n, vocab)
                prob = logp.gather(1, targets[:, None])[:, 0].exp()  # (n,)
                acc[pol]["top1"] += float((logp.argmax(-1) == targets).sum())
                acc[pol]["target_prob"] += float(prob.sum())
                acc[pol]["kl"] += sum(steer_sweep.kl(base, lp) for lp in logp)
                j = int(prob.argmax())
                if name == "ends_function" and pol == "last_function" and (best is None or prob[j] > best[0]):
                    best = (float(prob[j]), i, cands[j])
            bar.update(1)
        n = max(1, len(seqs) * len(cands))
        out[name] = {
            "cases": len(seqs) * len(cands),
            "unsteered_target_prob": base_prob / n,
            **{pol: {k: v / n for k, v in a.items()} for pol, a in acc.items()},
        }
    bar.close()
    return {"layer": layer, "strength": strength, "candidates": cands, "variants": out, "best": best}


def showcase(am, prompts: list[str], study: dict, norm: float) -> dict | None:
    """The study case (ends_function prompt, feature) where steering the last function token gives the target the
    highest probability, swept over strengths, with greedy continuations at the study strength."""
    if study["best"] is None:
        return None
    _, i, (f, t) = study["best"]
    strengths = tuple(round(m * norm, 1) for m in NORM_MULTIPLES)
    cfg = steer_sweep.SweepConfig(study["layer"], f, strengths, continuation_strength=study["strength"])
    return steer_sweep.sweep(am, prompts[i], cfg, am.decode([t]))


def function_token_share(summary: dict) -> float:
    fn = sum(r["count"] for r in summary["table"] if r["is_function"])
    return fn / summary["tokens"] if summary["tokens"] else 0.0


def report_dir(model) -> Path:
    """Where a model's report lives: analysis/ for the demo model, analysis/MODEL_NAME/ for any other."""
    return ANALYSIS_DIR if Path(model).resolve() == DEMO_MODEL.resolve() else ANALYSIS_DIR / Path(model).name


def headline(ctx: dict) -> dict:
    """The numbers a reader compares across models (deepest SAE layer where a layer is needed)."""
    deep = max(ctx["coverage"]["layers"], key=int)
    deep_cov = ctx["coverage"]["layers"][deep]
    layers = ctx["reactivation"]["layers"]
    deep_re = layers[max(layers, key=int)]["function"]
    ef = ctx["steering"]["study"]["variants"]["ends_function"]
    return {
        "model": ctx["model_name"],
        "n_function_tokens": ctx["function_tokens"]["n_function_tokens"],
        "heldout_fn_share": ctx["heldout_fn_share"],
        "function_tokens_coverage": deep_cov["function_tokens_coverage"],
        "random_sets_coverage": deep_cov["random_sets_coverage"],
        "analytic_chance_coverage": deep_cov["analytic_chance_coverage"],
        "coverage_verdict": ctx["coverage"]["nulls"][deep]["findings"]["coverage_m1"].verdict,
        "next_k_coverage": deep_cov["next_k_coverage"],
        "reactivated_predictive": deep_re["predictive_share_reactivated"],
        "other_predictive": deep_re["predictive_share_other"],
        "fc_loss_share": ctx["loss_split"][-1]["groups"]["function->content"]["loss_share"],
        "steer_top1_function": ef["last_function"]["top1"],
        "steer_top1_content": ef["last_content"]["top1"],
    }


def all_summaries(mine: dict) -> list[dict]:
    """Every report's summary.json in the repository (analysis/ and analysis/*/), this run's replacing its own."""
    found = [ANALYSIS_DIR / "summary.json", *sorted(ANALYSIS_DIR.glob("*/summary.json"))]
    runs = [json.loads(p.read_text()) for p in found if p.is_file()]
    runs = [r for r in runs if r.get("model") != mine["model"]]
    return sorted([*runs, mine], key=lambda r: r["model"])


@dataclass
class Section:
    """One part of the report: `run(am, ctx)` computes it (ctx holds the prompts, the token stream, the figures
    directory and the earlier sections' results), `markdown(result, ctx)` words it."""

    name: str
    run: Callable
    markdown: Callable


def run_coverage(am, ctx) -> dict:
    cfg = coverage.CoverageConfig()
    cov = coverage.summarize(coverage.build_graphs(am, ctx["stream"], cfg), am.fn_mask, am.decode, cfg.nulls)
    cov["seq_len"] = cfg.seq_len
    n_fn_seen = next(iter(cov["layers"].values()))["function_tokens_seen"]
    coverage.plot(cov, n_fn_seen, ctx["figs"])
    coverage.coverage_null.plot(cov["nulls"], ctx["figs"] / "coverage_null.png")
    cov["findings"] = {}
    for layer, nl in cov["nulls"].items():
        for name, f in nl["findings"].items():
            cov["findings"].setdefault(name, {})[layer] = f
    ctx["milestones"] = coverage.milestone_rows(cov["table"])
    ctx["heldout_fn_share"] = function_token_share(cov)
    return cov


def coverage_markdown(cov: dict, ctx) -> tuple[str, list[str]]:
    text, notes = render_findings.coverage_markdown(cov, ctx["milestones"])
    wtext, wnotes = render_findings.width_markdown(ctx["out"])
    return text + wtext, notes + wnotes


def run_reactivation(am, ctx) -> dict:
    rcfg = reactivation.ReactivationConfig(detail=False)
    rsum = reactivation.summarize(reactivation.score_prompts(am, ctx["prompts"], rcfg, progress=True), rcfg.top_frac)
    reactivation.plot(rsum, ctx["figs"] / "reactivation.png")
    return rsum


def run_loss_split(am, ctx) -> list:
    ckpts = loss_split.discover_checkpoints(ctx["model_dir"])
    ls_cfg = loss_split.LossSplitConfig(max_tokens=min(ctx["loss_tokens"], len(ctx["stream"])))
    ctx["loss_tokens"] = ls_cfg.max_tokens
    ls = loss_split.over_checkpoints(am, ckpts, ctx["stream"][: ls_cfg.max_tokens], ls_cfg, am_dir=ctx["model_dir"])
    loss_split.plot(ls, ctx["figs"] / "loss_split.png")
    return ls


def run_steering(am, ctx) -> dict:
    prompts, stream = ctx["prompts"], ctx["stream"]
    layer = max(am.saes)
    norm = median_residual_norm(am, prompts, layer)
    study = steering_study(am, prompts, layer, round(STUDY_MULTIPLE * norm, 1))
    case = showcase(am, prompts, study, norm)
    contexts = []
    if case is not None:
        steer_sweep.plot(case, ctx["figs"] / "steer_sweep.png")
        fcfg = FeaturesConfig(layer, (case["feature"],), contexts=3, max_tokens=min(len(stream), 16384))
        top = top_contexts(am, stream[: fcfg.max_tokens], [case["feature"]], fcfg)
        for v, p in zip(top.values[0].tolist(), top.where[0].tolist(), strict=True):
            if p >= 0 and v > 0:
                contexts.append((v, am.decode(stream[max(0, p - 12) : p].tolist()), am.decode([int(stream[p])])))
    return {"norm": norm, "study": study, "case": case, "contexts": contexts}


SECTIONS = [
    Section("coverage", run_coverage, coverage_markdown),
    Section("reactivation", run_reactivation, lambda r, ctx: render.reactivation_section(ctx)),
    Section("loss_split", run_loss_split, lambda r, ctx: render.loss_section(ctx)),
    Section("steering", run_steering, lambda r, ctx: render.steering_section({**ctx, **r}, ctx["decode"])),
]


def findings_json(ctx: dict, sections) -> dict:
    """{finding: {layer: Finding.to_json()}} over every section that states findings: what summary.json carries."""
    out = {}
    for sec in sections:
        res = ctx.get(sec.name)
        for name, by_layer in (res.get("findings", {}) if isinstance(res, dict) else {}).items():
            out[name] = {str(layer): f.to_json() for layer, f in by_layer.items()}
    return out


def main(args) -> int:
    from functok_vllm.analysis.model import load_hf

    t_start, load = time.time(), os.getloadavg()[0]
    corpus = getattr(args, "corpus", None)
    check_corpus(corpus)
    out = out_dir(args.out or report_dir(args.model))
    figs = out_dir(out / "figures")
    am = load_hf(args.model, args.saes, args.function_tokens)
    prompts_path = Path(args.prompts) if args.prompts else out / "prompts.jsonl"
    made = args.rebuild_prompts or args.prompts is None or not prompts_path.is_file()
    if args.rebuild_prompts or not prompts_path.is_file():
        write_jsonl(prompts_path, [{"prompt": p} for p in make_prompts(am, corpus=corpus)])
    prompts = read_prompts(prompts_path)
    stream = token_stream(am.encode, am.eos_id, corpus, args.max_tokens)
    fts = json.loads(Path(args.function_tokens).read_text())
    archs = {sae.cfg.architecture for sae in am.saes.values()}
    where = ", ".join(rel(c) for c in corpus) if corpus else "held-out split of the shared corpus"
    ctx = {
        "model": rel(args.model),
        "model_dir": args.model,
        "model_name": Path(args.model).name,
        "saes": rel(args.saes),
        "sae_tokens": sae_tokens(Path(args.saes)),
        "architectures": "/".join(sorted({{"jumprelu": "JumpReLU", "topk": "TopK"}.get(a, a) for a in archs})),
        "multiple": STUDY_MULTIPLE,
        "function_tokens": fts,
        "corpus": f"text of {where}" if corpus else where,
        "heldout": not corpus,
        "tokens_analysed": f"{len(stream):,} tokens"
        + (f", budget {args.max_tokens:,}" if args.max_tokens else ", all of them"),
        "n_prompts": len(prompts),
        "prompts": prompts,
        "prompts_path": rel(prompts_path),
        "prompts_origin": f"openings of {'held-out ' if not corpus else ''}paragraphs cut after a function token"
        if made
        else "given by --prompts",
        "stream": stream,
        "figs": figs,
        "out": out,
        "decode": lambda i: am.decode([i]),
        "loss_tokens": args.loss_tokens,
        "threads": torch.get_num_threads(),
        "load": load,
        "n_layers": am.model.config.num_hidden_layers,
        "n_params": sum(p.numel() for p in am.model.parameters()),
        "max_tokens": args.max_tokens,
        "timings": {},
    }
    for sec in SECTIONS:
        t = time.time()
        ctx[sec.name] = sec.run(am, ctx)
        ctx["timings"][sec.name] = time.time() - t
    ctx["total_seconds"] = time.time() - t_start
    summary = headline(ctx) | {"findings": findings_json(ctx, SECTIONS)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ctx["all_summaries"] = all_summaries(summary)
    path = out / "REPORT.md"
    path.write_text(render.render(ctx, SECTIONS))
    print(f"wrote {path} and {figs}/*.png in {ctx['total_seconds']:.0f} s")
    return 0
