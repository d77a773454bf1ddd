"""`functok analyze report`: regenerate a model's REPORT.md and figures (analysis/ for the demo model, else
analysis/MODEL_NAME/).

Every number in the report comes from this run, and every sentence that compares with the paper is chosen by a
condition on those numbers. Budgets keep it to a few minutes on two CPU threads.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from functok_vllm.analysis import coverage, studies
from functok_vllm.analysis.data import corpus_documents, read_prompts, token_stream
from functok_vllm.analysis.io import out_dir, write_jsonl
from functok_vllm.analysis.render import render
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


def make_prompts(am, n: int = N_PROMPTS, max_tokens: int = 40, min_cut: int = 10) -> list[str]:
    """Held-out paragraph openings cut right after their last function word (an alphabetic function token) within
    the first max_tokens tokens, so each prompt asks for the content word that follows."""
    prompts = []
    for doc in corpus_documents(None):
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
    """The numbers a reader compares across models (deepest SAE layer where a layer is needed), and every finding."""
    deep_cov = ctx["coverage"]["layers"][max(ctx["coverage"]["layers"], key=int)]
    rows = ctx["studies"]["results"]["loss_split"]["rows"]
    return {
        "model": ctx["model_name"],
        "n_function_tokens": ctx["function_tokens"]["n_function_tokens"],
        "heldout_fn_share": ctx["heldout_fn_share"],
        "function_tokens_coverage": deep_cov["function_tokens_coverage"],
        "next_k_coverage": deep_cov["next_k_coverage"],
        "fc_loss_share": rows[-1]["groups"]["function->content"]["loss_share"],
        "findings": {f.name: f.to_json() for f in ctx["studies"]["findings"]},
    }


def all_summaries(mine: dict) -> list[dict]:
    """Every report's summary.json in the repository (analysis/ and analysis/*/), this run's replacing its own."""
    found = [ANALYSIS_DIR / "summary.json", *sorted(ANALYSIS_DIR.glob("*/summary.json"))]
    runs = [json.loads(p.read_text()) for p in found if p.is_file()]
    runs = [r for r in runs if r.get("model") != mine["model"]]
    return sorted([*runs, mine], key=lambda r: r["model"])


def main(args) -> int:
    from functok_vllm.analysis.model import load_hf

    t_start, load = time.time(), os.getloadavg()[0]
    out = out_dir(args.out or report_dir(args.model))
    figs = out_dir(out / "figures")
    timings = {}
    am = load_hf(args.model, args.saes, args.function_tokens)
    prompts_path = Path(args.prompts) if args.prompts else out / "prompts.jsonl"
    made = args.rebuild_prompts or args.prompts is None or not prompts_path.is_file()
    if args.rebuild_prompts or not prompts_path.is_file():
        write_jsonl(prompts_path, [{"prompt": p} for p in make_prompts(am)])
    prompts = read_prompts(prompts_path)
    stream = token_stream(am.encode, am.eos_id, None, args.max_tokens)

    t = time.time()
    cov = coverage.summarize(coverage.build_graphs(am, stream, coverage.CoverageConfig()), am.fn_mask, am.decode)
    n_fn_seen = next(iter(cov["layers"].values()))["function_tokens_seen"]
    coverage.plot(cov, n_fn_seen, figs)
    timings["coverage"] = time.time() - t

    # controlled findings (issue 22 part B): re-activation, loss dynamics, steering study, case study
    loss_tokens = min(args.loss_tokens, args.max_tokens)
    st = studies.run_all(am, prompts, stream, args.model, figs, loss_tokens)
    timings.update(st["timings"])

    fts = json.loads(Path(args.function_tokens).read_text())
    archs = {sae.cfg.architecture for sae in am.saes.values()}
    ctx = {
        "model": rel(args.model),
        "saes": rel(args.saes),
        "sae_tokens": sae_tokens(Path(args.saes)),
        "architectures": "/".join(sorted({{"jumprelu": "JumpReLU", "topk": "TopK"}.get(a, a) for a in archs})),
        "function_tokens": fts,
        "heldout_fn_share": function_token_share(cov),
        "coverage": cov,
        "milestones": coverage.milestone_rows(cov["table"]),
        "n_prompts": len(prompts),
        "prompts_path": rel(prompts_path),
        "prompts_origin": "openings of held-out paragraphs cut after a function token"
        if made
        else "given by --prompts",
        "studies": st,
        "timings": timings,
        "total_seconds": time.time() - t_start,
        "threads": torch.get_num_threads(),
        "load": load,
        "n_layers": am.model.config.num_hidden_layers,
        "n_params": sum(p.numel() for p in am.model.parameters()),
        "max_tokens": args.max_tokens,
        "loss_tokens": loss_tokens,
    }
    ctx["model_name"] = Path(args.model).name
    summary = headline(ctx)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ctx["all_summaries"] = all_summaries(summary)
    path = out / "REPORT.md"
    path.write_text(render(ctx, lambda i: am.decode([i])))
    print(f"wrote {path} and {figs}/*.png in {ctx['total_seconds']:.0f} s")
    return 0
