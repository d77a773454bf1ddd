"""REPORT.md from the numbers of one report run: tables, figures, and comparison sentences chosen by conditions."""

from __future__ import annotations

from functok_vllm.analysis.studies import agreement


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def tok(s: str) -> str:
    return "`" + repr(s).replace("`", "'").replace("|", "\\|") + "`"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def verdict(ok: bool) -> str:
    return "**agrees**" if ok else "**does not agree**"


def function_tokens(ctx: dict) -> tuple[str, list[str]]:
    ft = ctx["function_tokens"]
    shown = ", ".join(tok(t["token"]) for t in ft["tokens"][:20])
    text = (
        f"## 1. Function tokens\n\n{ft['n_function_tokens']} tokens, the most frequent ones covering "
        f"{pct(ft['achieved_coverage'])} of the {ft['total_tokens']:,} tokens of the training documents "
        f"(`functok function-tokens --coverage {ft['coverage']}{' --skip-heldout' if ft.get('skip_heldout') else ''}`"
        "). On the "
        f"{ctx['coverage']['tokens']:,} held-out tokens analysed here they are {pct(ctx['heldout_fn_share'])} of all "
        f"positions. The 20 most frequent: {shown}.\n\n"
    )
    return text, []


def coverage_section(ctx: dict) -> tuple[str, list[str]]:
    cov = ctx["coverage"]
    layers = cov["layers"]
    rows = [
        [
            L,
            f"{s['token_nodes']:,}",
            f"{s['feature_nodes']:,} / {s['d_sae']:,} ({pct(s['dictionary_reached_share'])})",
            f"{s['edges']:,}",
            f"{s['mean_degree_function']:.1f}",
            f"{s['mean_degree_content']:.1f}",
            f"{s['spearman_degree_frequency']:.2f}",
            pct(s["function_tokens_coverage"]),
            pct(s["next_k_coverage"]),
        ]
        for L, s in layers.items()
    ]
    head = ["layer", "token nodes", "feature nodes (reached)", "edges", "mean degree, function", "mean degree, content"]
    head += ["Spearman(degree, freq.)", "function tokens cover", "next-k tokens cover"]
    mrows = [[r["rank"], tok(r["token"]), "yes" if r["is_function"] else ""] for r in ctx["milestones"]]
    for m, r in zip(mrows, ctx["milestones"], strict=True):
        m += [pct(r[f"coverage_L{L}"]) for L in layers]
    k = next(iter(layers.values()))["function_tokens_seen"]
    text = (
        "## 2. The token-feature bipartite graph\n\nEdge (token, feature) when the feature is active (encoder output "
        "> 0) at some position holding the token; EOS separators excluded. *Coverage* of a token set: the share of the "
        f"reached features that at least one of its tokens reaches. *next-k*: the {k} tokens ranked just after the "
        f"{k} most frequent ones, a same-size baseline.\n\n"
        + table(head, rows)
        + "\nCumulative coverage by frequency rank (the paper's table):\n\n"
        + table(["rank", "token", "function"] + [f"layer {L}" for L in layers], mrows)
        + "\n![coverage vs rank](figures/coverage_vs_rank.png)\n"
        + "![degree vs frequency](figures/degree_vs_frequency.png)\n\n"
    )
    covs = [s["function_tokens_coverage"] for s in layers.values()]
    majority = all(c > 0.5 for c in covs)
    above = all(s["function_tokens_coverage"] > s["next_k_coverage"] for s in layers.values())
    rho = all(s["spearman_degree_frequency"] > 0 for s in layers.values())
    lo, hi = min(covs), max(covs)
    notes = [
        f"Coverage {verdict(majority)}: the {k} function tokens reach {pct(lo)} to {pct(hi)} of the reached features "
        f"across the SAE layers ({'a majority at every layer' if majority else 'not a majority at every layer'}), "
        f"{'more' if above else 'not always more'} than the next {k} most frequent tokens reach.",
        f"Degree {'rises' if rho else 'does not rise'} with token frequency at every layer (Spearman "
        + ", ".join(f"{s['spearman_degree_frequency']:.2f}" for s in layers.values())
        + ")"
        + (", as the paper's log-log plot shows." if rho else ", unlike the paper's log-log plot."),
    ]
    return text, notes


def verdict_counts(run: dict) -> str:
    vs = [f["verdict"] for f in run.get("findings", {}).values()]
    return " / ".join(str(vs.count(v)) for v in ("supports", "does not support", "inconclusive"))


def across_models(ctx: dict) -> str:
    """The headline numbers of every report run found (`summary.json` beside each REPORT.md), one column a model."""
    runs = ctx.get("all_summaries") or []
    if len(runs) < 2:
        return ""
    keys = [
        ("function tokens (40% rule)", lambda r: str(r["n_function_tokens"])),
        ("their share of held-out positions", lambda r: pct(r["heldout_fn_share"])),
        ("features reached by function tokens, deepest layer", lambda r: pct(r["function_tokens_coverage"])),
        ("same for the next-k tokens", lambda r: pct(r["next_k_coverage"])),
        ("loss share function->content, final model", lambda r: pct(r.get("fc_loss_share"))),
        ("findings: supports / does not support / inconclusive", verdict_counts),
    ]
    rows = [[label] + [fn(r) for r in runs] for label, fn in keys]
    return "Across the models reported in this repository:\n\n" + table([""] + [r["model"] for r in runs], rows) + "\n"


def render(ctx: dict, decode) -> str:
    parts, notes = [], []
    for fn in (function_tokens, coverage_section):
        t, n = fn(ctx)
        parts.append(t)
        notes += n
    parts += ctx["studies"]["sections"]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in ctx["timings"].items())
    head = (
        f"# {ctx['model_name']} and the function token hypothesis\n\n"
        f"Generated by `functok analyze report` (do not edit by hand). Model `{ctx['model']}` (transformers "
        f"engine, float32), {ctx['architectures']} SAEs from `{ctx['saes']}`, held-out split of the shared corpus "
        f"(budget {ctx['max_tokens']:,} tokens). Run time {ctx['total_seconds']:.0f} s on {ctx['threads']} CPU "
        f"threads ({timing}); the machine's load average was {ctx['load']:.1f} when the run started.\n\n"
    )
    verdicts = "## Agreement with the paper\n\n" + "".join(f"- {n}\n" for n in notes)
    verdicts += agreement(ctx["studies"]["findings"]) + "\n"
    verdicts += across_models(ctx)
    tokens = ctx.get("sae_tokens")
    trained = f"by this project on {tokens:,} tokens" if tokens else "elsewhere (no training_report.json)"
    size = f"A {ctx['n_layers']}-layer model of {ctx['n_params'] / 1e6:.1f}M parameters"
    scale = (
        f"{size} trained on {len(ctx['function_tokens']['corpus'])} public-domain texts, with small SAEs, is far "
        "from the paper's models; agreement here is a sanity check of the pipeline, not a replication."
        if ctx["n_params"] < 5e7
        else f"{size} (a real pretrained model, far smaller than the paper's), SAEs trained {trained} on the "
        "shared corpus of public-domain texts, and a held-out split of the same texts: the measurements are real "
        "but narrow, and every number comes with the corpus it was measured on."
    )
    caveats = (
        "## Caveats\n\n"
        f"- {scale}\n"
        "- The steering study picks features by their logit lens; its targets are those features' top words, so it "
        "measures how well a feature pushes its own word, not every use of steering.\n"
    )
    return head + "".join(parts) + verdicts + caveats
