"""REPORT.md from the numbers of one report run: the frame (header, sections in order, the verdict list, caveats) and
the sections not yet stated as findings (re-activation, loss split, steering: sentences chosen by conditions).

Each section of `report.SECTIONS` gives its markdown and its verdict sentences; sections whose results are `Finding`s
word them through `render_findings.verdict_line`, so a verdict can read "does not support".
"""

from __future__ import annotations

from functok_vllm.analysis.loss_split import GROUPS
from functok_vllm.analysis.steer_sweep import POLICIES

TIE = 0.95  # a share at least this fraction of the largest one counts as a tie with it


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


def z_two_shares(hits1: int, n1: int, hits2: int, n2: int) -> float:
    """Two-proportion z statistic (pooled variance); 0 when either group is empty or the pooled share is 0 or 1."""
    if not n1 or not n2:
        return 0.0
    pool = (hits1 + hits2) / (n1 + n2)
    var = pool * (1 - pool) * (1 / n1 + 1 / n2)
    return (hits1 / n1 - hits2 / n2) / var**0.5 if var > 0 else 0.0


def function_tokens(ctx: dict) -> tuple[str, list[str]]:
    ft = ctx["function_tokens"]
    shown = ", ".join(tok(t["token"]) for t in ft["tokens"][:20])
    text = (
        f"## 1. Function tokens\n\n{ft['n_function_tokens']} tokens, the most frequent ones covering "
        f"{pct(ft['achieved_coverage'])} of the {ft['total_tokens']:,} tokens of the training documents "
        f"(`functok function-tokens --coverage {ft['coverage']}{' --skip-heldout' if ft.get('skip_heldout') else ''}`"
        "). On the "
        f"{ctx['coverage']['tokens']:,} {'held-out ' if ctx.get('heldout', True) else ''}tokens analysed here "
        f"(attention sinks left out) they are {pct(ctx['heldout_fn_share'])} of all "
        f"positions. The 20 most frequent: {shown}.\n\n"
    )
    return text, []


def reactivation_section(ctx: dict) -> tuple[str, list[str]]:
    r = ctx["reactivation"]
    rows = []
    for L, kinds in r["layers"].items():
        f, c = kinds["function"], kinds["content"]
        rows.append(
            [L, f["positions"], pct(f["reactivated_share"]), pct(c["reactivated_share"])]
            + [pct(f["predictive_share_reactivated"]), pct(f["predictive_share_other"])]
            + [pct(c["predictive_share_reactivated"]), pct(c["predictive_share_other"])]
        )
    head = ["layer", "function positions", "re-activated (function pos.)", "re-activated (content pos.)"]
    head += ["predictive: re-act. (fn)", "predictive: other (fn)", "predictive: re-act. (content)"]
    head += ["predictive: other (content)"]
    text = (
        f"## 3. Re-activation at function tokens\n\n{ctx['n_prompts']} prompts (`{ctx['prompts_path']}`, "
        f"{ctx['prompts_origin']}). At a position, a feature is *re-activated* if "
        "it was active at an earlier content-token position of the prompt, and *predictive* if the model's own next "
        f"token there is among the top {r['k']} tokens ({pct(r['top_frac'])} of the vocabulary, the chance level) of "
        "the feature's logit lens U·(g⊙W_dec[f]). Content positions are scored the same way as a control.\n\n"
        + table(head, rows)
        + "\n![reactivation](figures/reactivation.png)\n\n"
    )
    notes = []
    for L, kinds in r["layers"].items():
        f, c = kinds["function"], kinds["content"]
        pr, po = f["predictive_share_reactivated"] or 0.0, f["predictive_share_other"] or 0.0
        z = z_two_shares(
            f["predictive_reactivated"], f["reactivated"], f["predictive_other"], f["active"] - f["reactivated"]
        )
        more = (f["reactivated_share"] or 0) > (c["reactivated_share"] or 0)
        judged = (
            f"the paper's 'function tokens re-activate the most predictive features' {verdict(z > 0)}"
            if abs(z) >= 2
            else "too close to call against the paper's 'function tokens re-activate the most predictive features'"
        )
        notes.append(
            f"Layer {L}: re-activated features at function tokens are {'more' if pr > po else 'less'} often "
            f"predictive than the other active features ({pct(pr)} vs {pct(po)}, chance {pct(r['top_frac'])}, "
            f"z = {z:.1f}, a rough statistic since features of one prompt are not independent): {judged}. Function "
            f"positions re-activate {'more' if more else 'no more'} of their features than content positions do "
            f"({pct(f['reactivated_share'])} vs {pct(c['reactivated_share'])})."
        )
    return text, notes


def loss_section(ctx: dict) -> tuple[str, list[str]]:
    ls = ctx["loss_split"]
    rows = [
        [r["checkpoint"], r["step"], f"{r['groups']['all']['mean_loss']:.3f}"]
        + [f"{r['groups'][g]['mean_loss']:.3f} ({pct(r['groups'][g]['loss_share'])})" for g in GROUPS]
        for r in ls
    ]
    shares = [pct(ls[-1]["groups"][g]["token_share"]) for g in GROUPS]
    text = (
        f"## 4. Loss split over training checkpoints\n\nNext-token cross-entropy on the first {ctx['loss_tokens']:,} "
        "held-out tokens, grouped by "
        "(current, next) token class; cells: mean loss in nats (share of the total loss). Token shares: "
        + ", ".join(f"{g} {s}" for g, s in zip(GROUPS, shares, strict=True))
        + ".\n\n"
        + table(["checkpoint", "step", "all"] + list(GROUPS), rows)
        + "\n![loss split](figures/loss_split.png)\n\n"
    )
    last, first = ls[-1]["groups"], ls[0]["groups"]
    top = max(GROUPS, key=lambda g: last[g]["loss_share"])
    fc = "function->content"
    rising = last[fc]["loss_share"] > first[fc]["loss_share"]
    hardest = max(GROUPS, key=lambda g: last[g]["mean_loss"] or 0)
    hardest_first = max(GROUPS, key=lambda g: first[g]["mean_loss"] or 0)
    tied = top != fc and last[fc]["loss_share"] >= TIE * last[top]["loss_share"]
    said = "**is roughly tied** with the paper's claim" if tied else verdict(top == fc)
    note = (
        f"Loss split {said}: at the final checkpoint the largest share of the loss is {top} "
        f"({pct(last[top]['loss_share'])}; {fc}: {pct(last[fc]['loss_share'])}"
        + (f", at least {pct(TIE)} of it" if tied else "")
        + ")"
    )
    if len(ls) == 1:  # a released model: no training checkpoints to follow
        text += "Only the released model is available here (no training checkpoints), so the trend over training "
        text += "is not measured on this model.\n\n"
        return text, [note + f"; the highest mean loss per token is {hardest} ({last[hardest]['mean_loss']:.3f} nats)."]
    note += (
        f". The {fc} share {'grows' if rising else 'does not grow'} from {ls[0]['checkpoint']} to "
        f"{ls[-1]['checkpoint']} ({pct(first[fc]['loss_share'])} -> {pct(last[fc]['loss_share'])}); the highest mean "
        f"loss per token is {hardest} at the final checkpoint ({last[hardest]['mean_loss']:.3f} nats) and "
        f"{hardest_first} at {ls[0]['checkpoint']} ({first[hardest_first]['mean_loss']:.3f} nats)."
    )
    return text, [note]


def steering_section(ctx: dict, decode) -> tuple[str, list[str]]:
    st = ctx["study"]
    rows = []
    for name, v in st["variants"].items():
        for pol in POLICIES:
            p = v[pol]
            rows.append([name, v["cases"], pol, pct(p["top1"]), f"{p['target_prob']:.3f}", f"{p['kl']:.2f}"])
    cands = ", ".join(f"{f}->{tok(decode(t))}" for f, t in st["candidates"][:8])
    text = (
        f"## 5. Steering at the last function token\n\nStudy: the {len(st['candidates'])} layer-{st['layer']} "
        "features whose logit lens has the largest top score on a content word (first ones: "
        f"{cands}), each added at strength {st['strength']} ({ctx['multiple']:g} × the median residual norm "
        f"{ctx['norm']:.1f} at that layer) to prompts that end on a function token (`ends_function`, where the last "
        "function token is the last position) and to the same prompts cut after their last content token "
        "(`ends_content`, where the last function token is earlier). Target: the feature's top lens token, at the "
        "next position.\n\n"
        + table(["prompts", "cases", "policy", "target becomes top-1", "mean p(target)", "mean KL"], rows)
        + "\n"
    )
    ef, ec = st["variants"]["ends_function"], st["variants"]["ends_content"]
    lf, lc = ef["last_function"], ef["last_content"]
    works = lf["top1"] > lc["top1"] and lf["target_prob"] > ef["unsteered_target_prob"]
    notes = [
        f"Steering at the last function token {verdict(works)}: on prompts ending with it, adding the feature there "
        f"makes the target the top next token in {pct(lf['top1'])} of cases (mean p(target) "
        f"{lf['target_prob']:.3f}, unsteered {ef['unsteered_target_prob']:.3f}), against {pct(lc['top1'])} when "
        "the same vector is added at the last content token."
    ]
    if ec["cases"]:
        far, near = ec["last_function"], ec["last_content"]
        notes.append(
            f"Through attention alone the model carries {'little' if far['top1'] < near['top1'] else 'much'} "
            f"of it: when the last function token is not the last position, steering it makes the target top-1 in "
            f"{pct(far['top1'])} of cases (KL {far['kl']:.2f}), steering the last position (a content token) in "
            f"{pct(near['top1'])} (KL {near['kl']:.2f})."
        )
    case = ctx["case"]
    if case is None:
        return (
            text + "The study had no prompt ending on a function token, or no candidate feature; no example shown.\n\n",
            notes,
        )
    pols = list(dict.fromkeys(r["policy"] for r in case["rows"]))
    strengths = list(dict.fromkeys(r["strength"] for r in case["rows"]))
    grid = {(r["policy"], r["strength"]): r for r in case["rows"]}
    srows = [[s] + [f"{grid[(p, s)]['target_prob']:.3f} / {grid[(p, s)]['kl']:.2f}" for p in pols] for s in strengths]
    ctxs = "\n".join(f"- {v:.1f}: …{tok(left)} **{tok(t)}**" for v, left, t in ctx["contexts"])
    conts = "\n".join(f"- {k}: {tok(v)}" for k, v in case["continuations"].items())
    text += (
        f"Example (the study case where steering the last function token gives the target its highest probability, "
        f"{ctx['study']['best'][0]:.3f}): prompt "
        f"{tok(case['prompt'])}, layer {case['layer']} feature {case['feature']}, target {tok(case['target'])}. "
        f"Its top-activating held-out contexts:\n\n{ctxs}\n\nSweep, cells p(target) / KL(unsteered ‖ steered):\n\n"
        + table(["strength"] + pols, srows)
        + f"\n![steer sweep](figures/steer_sweep.png)\n\nGreedy continuations (strength "
        f"{case['continuation_strength']}):\n\n{conts}\n\n"
    )
    return text, notes


def across_models(ctx: dict) -> str:
    """The headline numbers of every report run found (`summary.json` beside each REPORT.md), one column a model."""
    runs = ctx.get("all_summaries") or []
    if len(runs) < 2:
        return ""
    keys = [
        ("function tokens (40% rule)", lambda r: str(r["n_function_tokens"])),
        ("their share of held-out positions", lambda r: pct(r["heldout_fn_share"])),
        ("features reached by function tokens, deepest layer", lambda r: pct(r["function_tokens_coverage"])),
        ("same for random content sets of the same share", lambda r: pct(r.get("random_sets_coverage"))),
        ("coverage verdict (m = 1), deepest layer", lambda r: r.get("coverage_verdict", "n/a")),
        ("same for the next-k tokens", lambda r: pct(r["next_k_coverage"])),
        ("re-activated & predictive at function tokens, deepest layer", lambda r: pct(r["reactivated_predictive"])),
        ("other active features predictive, deepest layer", lambda r: pct(r["other_predictive"])),
        ("loss share function->content, final model", lambda r: pct(r["fc_loss_share"])),
        ("last-function steering: target top-1 (ends_function)", lambda r: pct(r["steer_top1_function"])),
        ("same prompts, steering their last content token", lambda r: pct(r["steer_top1_content"])),
    ]
    rows = [[label] + [fn(r) for r in runs] for label, fn in keys]
    return "Across the models reported in this repository:\n\n" + table([""] + [r["model"] for r in runs], rows) + "\n"


def render(ctx: dict, sections) -> str:
    """REPORT.md: the header, function tokens, each section's markdown (`section.markdown(result, ctx)` ->
    (text, verdict sentences)) in order, the verdicts of every section, the caveats."""
    parts, notes = [], []
    t, n = function_tokens(ctx)
    parts.append(t)
    for sec in sections:
        t, n = sec.markdown(ctx[sec.name], ctx)
        parts.append(t)
        notes += n
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in ctx["timings"].items())
    head = (
        f"# {ctx['model_name']} and the function token hypothesis\n\n"
        f"Generated by `functok analyze report` (do not edit by hand). Model `{ctx['model']}` (transformers "
        f"engine, float32), {ctx['architectures']} SAEs from `{ctx['saes']}`, {ctx['corpus']} "
        f"({ctx['tokens_analysed']}). Run time {ctx['total_seconds']:.0f} s on {ctx['threads']} CPU "
        f"threads ({timing}); the machine's load average was {ctx['load']:.1f} when the run started.\n\n"
    )
    verdicts = (
        "## 6. Agreement with the paper\n\nEach line is decided against a null (what frequency, position or chance "
        "alone gives); the wording follows from the verdict.\n\n"
    )
    verdicts += "".join(f"- {n}\n" for n in notes) + "\n"
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
        "## 7. Caveats\n\n"
        f"- {scale}\n"
        "- 'Predictive' is a logit-lens proxy (top share of the decoder direction read through the unembedding), not a "
        "causal measurement; early layers read through the final unembedding are only loosely meaningful.\n"
        "- The steering study picks features by their logit lens and uses one strength; the example is the best case "
        "of the study, so it shows that steering can work, while the table shows how often.\n"
    )
    return head + "".join(parts) + verdicts + caveats
