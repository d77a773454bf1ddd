"""REPORT.md parts that state findings: the coverage section beside its nulls, the width study, and the verdict lines
of every `Finding` (wording generated from the verdict, so it can say "does not support")."""

from __future__ import annotations

import json
from pathlib import Path

from functok_vllm.analysis.verdict import DOES_NOT_SUPPORT, SUPPORTS, Finding
from functok_vllm.core.sinks import SINK_NORM_RATIO

CLAIMS = {  # what each finding would show if it came out "supports"
    "coverage_m1": "function tokens reach more of the features than frequency alone gives (coverage, m = 1)",
    "enrichment": "features fire on function tokens more than their share of positions (enrichment)",
}


def claim(name: str) -> str:
    if name.startswith("coverage_m") and name not in CLAIMS:
        return f"function tokens reach more of the features than frequency alone gives (coverage, m = {name[10:]})"
    return CLAIMS.get(name, name.replace("_", " "))


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x, pc: bool) -> str:
    return pct(x) if pc else ("n/a" if x is None else f"{x:.3g}")


def span(iv, pc: bool = True) -> str:
    return "n/a" if iv is None or any(v is None for v in iv) else f"[{num(iv[0], pc)}, {num(iv[1], pc)}]"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def verdict_line(name: str, layer, f: Finding | dict) -> str:
    """One finding in words, its wording chosen by its verdict."""
    j = f.to_json() if isinstance(f, Finding) else f
    pc = not name.startswith("enrichment")
    v = j["verdict"]
    says = {SUPPORTS: "**supports**", DOES_NOT_SUPPORT: "**does not support**"}.get(v, "is **inconclusive** about")
    band = f" (null band {span(j.get('null_interval'), pc)})" if j.get("null_interval") else ""
    low = (j.get("null_interval") or [j["null"]])[0]
    below = j["interval"][1] is not None and low is not None and j["interval"][1] < low
    return (
        f"Layer {layer}: the data {says} the claim that {claim(name)}: {num(j['statistic'], pc)} "
        f"(95% interval {span(j['interval'], pc)}) against a null of {num(j['null'], pc)}{band}"
        + ("; it lies below what the null gives." if below else ".")
    )


def coverage_markdown(cov: dict, milestones: list[dict]) -> tuple[str, list[str]]:
    """The coverage section: graph counts, the coverage beside its nulls at each m, enrichment, the paper's table."""
    layers, nulls = cov["layers"], cov["nulls"]
    first = next(iter(nulls.values()))
    ms = list(first["by_m"])
    rows = []
    for L, s in layers.items():
        nl = nulls[L]
        rows.append(
            [L, f"{s['token_nodes']:,}", f"{s['feature_nodes']:,} / {s['d_sae']:,}", f"{s['edges']:,}"]
            + [f"{nl['by_m'][m]['edges']:,}" for m in ms[1:]]
            + [f"{s['mean_degree_function']:.1f}", f"{s['mean_degree_content']:.1f}"]
            + [f"{s['spearman_degree_frequency']:.2f}", f"{nl['sinks_excluded']:,}"]
        )
    head = ["layer", "token nodes", "features reached", "edges"] + [f"edges with >= {m} firings" for m in ms[1:]]
    head += ["mean degree, function", "mean degree, content", "Spearman(degree, freq.)", "sink positions left out"]
    nrows = []
    for L in layers:
        for m in ms:
            b, f = nulls[L]["by_m"][m], nulls[L]["findings"][f"coverage_m{m}"]
            nrows.append(
                [L, m, f"{b['features']:,}", pct(b["function_coverage"]), span(b["interval"])]
                + [pct(b["random_mean"]), span(b["random_band"]), pct(b["analytic"])]
                + [f"{b['percentile']:.0f}", f"{b['p_value']:.3f}", f.verdict]
            )
    nhead = ["layer", "m", "features firing >= m", "function tokens", "95% interval (windows)"]
    nhead += ["random sets (mean)", "random sets 95% band", "analytic chance", "percentile", "p", "verdict"]
    erows = []
    for L in layers:
        e, f = nulls[L]["enrichment"], nulls[L]["findings"].get("enrichment")
        if f is not None:
            erows.append(
                [L, e["features"], f"{f.statistic:.2f}", span(f.interval, False), f"{f.null:.2f}"]
                + [span(f.null_interval, False), pct(e["share_enriched"]), f.verdict]
            )
    ehead = ["layer", "features (>= 10 firings)", "median enrichment", "95% interval (features)", "null"]
    ehead += ["null 95% band", "share enriched (> 1)", "verdict"]
    mrows = [[r["rank"], tok(r["token"]), "yes" if r["is_function"] else ""] for r in milestones]
    for m, r in zip(mrows, milestones, strict=True):
        m += [pct(r[f"coverage_L{L}"]) for L in layers]
    q = first["function_share"]
    text = (
        "## 2. Coverage of the token-feature graph, beside what frequency alone gives\n\n"
        "Edge (token, feature) when the feature is active (encoder output > 0) at some position holding the token; "
        "EOS separators excluded. **Attention sinks are left out by default** (`functok_vllm/core/sinks.py`): the "
        f"first position of every {cov.get('seq_len', 256)}-token window, BOS, and any position whose residual norm "
        f"at the layer read exceeds {SINK_NORM_RATIO:g}x its window's median (the table counts them). *Coverage* of a "
        "token set: the share of the features that fire at least m times which fire at least m times on the set's "
        f"positions (m = 1 is the paper's edge). The function tokens hold {pct(q)} of the positions analysed. Nulls: "
        f"{first.get('n_random', 200)} random sets of content tokens drawn until they hold the same share of "
        f"positions (on average {first['random_set_tokens']:.0f} tokens, {pct(first['random_set_share'])}), and the "
        "analytic level mean_f P(Binomial(n_f, q) >= m), what coverage would be if a feature fired regardless of "
        "the token. The verdict compares the function tokens' interval (a bootstrap over windows; m > 1 has none, "
        "the null's band carries the spread) with the random sets' band.\n\n"
        + table(head, rows)
        + "\nCoverage against its nulls:\n\n"
        + table(nhead, nrows)
        + "\nPer-feature enrichment: (share of a feature's firings on function positions) / (their share of "
        "positions), 1 = chance; null: the same firing counts split binomially with probability q.\n\n"
        + table(ehead, erows)
        + "\nCumulative coverage by frequency rank (the paper's table, m = 1):\n\n"
        + table(["rank", "token", "function"] + [f"layer {L}" for L in layers], mrows)
        + "\n![coverage nulls](figures/coverage_null.png)\n\n"
        "Rows: layers. Columns: the random sets' coverage with the function tokens (red) and the analytic level "
        "(dashed); rarefaction (expected distinct features among s positions drawn from function vs content "
        "positions); per-feature enrichment; feature firing frequencies.\n\n"
        "![coverage vs rank](figures/coverage_vs_rank.png)\n![degree vs frequency](figures/degree_vs_frequency.png)\n\n"
    )
    notes = [verdict_line(name, L, f) for L in layers for name, f in nulls[L]["findings"].items()]
    rho = [s["spearman_degree_frequency"] for s in layers.values()]
    notes.append(
        f"Degree {'rises' if all(r > 0 for r in rho) else 'does not rise'} with token frequency at every layer "
        f"(Spearman {', '.join(f'{r:.2f}' for r in rho)}), as the paper's log-log plot shows; frequency alone "
        "predicts this (a token seen more often meets more features), so it is no test of the hypothesis."
    )
    return text, notes


def tok(s: str) -> str:
    return "`" + repr(s).replace("`", "'").replace("|", "\\|") + "`"


def width_markdown(out: Path) -> tuple[str, list[str]]:
    """The width study (scripts/coverage_width.py) if it was run for this model: width.json beside the report."""
    path = out / "width" / "width.json"
    if not path.is_file():
        return "", []
    w = json.loads(path.read_text())
    m = f"m{w['m']}"
    rows = []
    for d, r in sorted(w["widths"].items(), key=lambda kv: int(kv[0])):
        a = r["all"]
        rows.append(
            [d, f"{r['final_nmse']:.3f}", f"{a['m1']['features']:,}", pct(a["m1"]["function_coverage"])]
            + [pct(a["m1"]["random_mean"]), pct(a["m1"]["analytic"]), a["m1"]["verdict"]]
            + [pct(a[m]["function_coverage"]), pct(a[m]["random_mean"]), a[m]["verdict"], f"{r['train_seconds']:.0f}"]
        )
    head = ["d_sae", "NMSE", "features reached", "function tokens (m=1)", "random sets", "analytic", "verdict"]
    head += [f"function tokens ({m})", "random sets", "verdict", "train s"]
    text = (
        f"### Coverage against SAE width and tokens\n\n`scripts/coverage_width.py`: SAEs of {len(w['widths'])} widths "
        f"at layer {w['layer']}, trained with the project's trainer (BatchTopK, k = {w['k']}, {w['steps']} steps) on "
        f"{w['train_tokens']:,} tokens of the training split; coverage on all {w['heldout_tokens']:,} held-out tokens "
        f"(whole {256}-token windows), which the SAEs never saw. Run time {w['total_seconds']:.0f} s on "
        f"{w['threads']} CPU threads.\n\n" + table(head, rows) + "\n![coverage vs width](width/coverage_width.png)\n\n"
        "What fitted a shared 2-core machine: widths up to 8x d_model, "
        f"{w['train_tokens']:,} training tokens and {w['steps']} steps (the shipped SAEs: 393,216 tokens, 1,200 "
        "steps); the train s column is what each width cost here. Training cost grows with d_sae x steps and the "
        "capture with tokens x d_sae, so the paper's regime (1M-wide SAEs, ~5M tokens: ~200x the width and ~100x "
        "the tokens) needs a GPU run of the same script (`--expansions`, `--train-tokens`; not measured here).\n\n"
    )
    return text, []
