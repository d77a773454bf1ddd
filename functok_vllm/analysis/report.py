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

from functok_vllm.analysis import coverage, render, render_findings, studies
from functok_vllm.analysis.data import check_corpus, corpus_documents, read_prompts, token_stream
from functok_vllm.analysis.io import out_dir, write_jsonl
from functok_vllm.paths import ANALYSIS_DIR, DEMO_MODEL, ROOT

N_PROMPTS = 30


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
    rows = ctx["studies"]["results"]["loss_split"]["rows"]
    return {
        "model": ctx["model_name"],
        "n_function_tokens": ctx["function_tokens"]["n_function_tokens"],
        "heldout_fn_share": ctx["heldout_fn_share"],
        "function_tokens_coverage": deep_cov["function_tokens_coverage"],
        "random_sets_coverage": deep_cov["random_sets_coverage"],
        "analytic_chance_coverage": deep_cov["analytic_chance_coverage"],
        "coverage_verdict": ctx["coverage"]["nulls"][deep]["findings"]["coverage_m1"].verdict,
        "next_k_coverage": deep_cov["next_k_coverage"],
        "fc_loss_share": rows[-1]["groups"]["function->content"]["loss_share"],
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


def run_studies(am, ctx) -> dict:
    """Part B's controlled findings (`studies.run_all`): re-activation against a cross-prompt null, the loss split as
    learning dynamics beside a bigram model, the position-matched steering study, the chat case study."""
    ctx["loss_tokens"] = min(ctx["loss_tokens"], len(ctx["stream"]))
    sizes = ctx["steer_prompts"], ctx["steer_features"]
    st = studies.run_all(am, ctx["prompts"], ctx["stream"], ctx["model_dir"], ctx["figs"], ctx["loss_tokens"], *sizes)
    ctx["timings"].update({f"studies.{k}": v for k, v in st["timings"].items()})
    by_name: dict = {}
    for f in st["findings"]:  # their names carry the layer or the strength already
        by_name.setdefault(f.name, {})["all"] = f
    st["findings_flat"] = st["findings"]
    st["findings"] = by_name
    return st


def studies_markdown(st: dict, ctx) -> tuple[str, list[str]]:
    return "".join(st["sections"]), []


SECTIONS = [
    Section("coverage", run_coverage, coverage_markdown),
    Section("studies", run_studies, studies_markdown),
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
        "steer_prompts": getattr(args, "steer_prompts", studies.STEER_PROMPTS),
        "steer_features": getattr(args, "steer_features", studies.STEER_FEATURES),
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
