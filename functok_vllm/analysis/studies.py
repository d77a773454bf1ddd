"""The report's controlled findings in one call: re-activation against a cross-prompt null, the loss split as learning
dynamics beside a bigram model, the position-matched steering study, and the chat case study.

`run_all` returns each study's markdown section, its `Finding`s and its run time, and writes each figure; the report
frame (`analysis/report.py`) places the sections and carries the findings into `summary.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from functok_vllm.analysis import case_study, loss_dynamics, loss_split, reactivation_study, steer_study

STEER_PROMPTS = 12  # prompts of the steering study (each runs 2 variants x 2 directions x 4 strengths)
STEER_FEATURES = 6  # candidate features per prompt
GENERATE = 6  # continuation tokens of the fluency figure


def study_layer(am) -> int:
    """The middle SAE layer: the deepest one leaves the least depth for a steer to act through, the shallowest
    reads little more than the token."""
    layers = sorted(am.saes)
    return layers[len(layers) // 2]


def run_all(
    am,
    prompts: list[str],
    stream: torch.Tensor,
    model_dir,
    figs: Path,
    loss_tokens: int,
    steer_prompts: int = STEER_PROMPTS,
    steer_features: int = STEER_FEATURES,
) -> dict:
    """{"sections": [markdown], "findings": [Finding], "timings": {study: seconds}, "results": {study: result}}."""
    out = {"sections": [], "findings": [], "timings": {}, "results": {}}

    def timed(name: str, fn):
        t = time.time()
        result = fn()
        out["timings"][name] = time.time() - t
        return result

    r = timed("reactivation", lambda: reactivation_study.run(am, prompts, progress=True))
    reactivation_study.plot(r, figs / "reactivation_study.png")
    out["sections"].append(reactivation_study.markdown(r))
    out["findings"] += r["findings"]
    out["results"]["reactivation"] = r

    def dynamics():
        cfg = loss_split.LossSplitConfig(max_tokens=loss_tokens)
        rows = loss_split.over_checkpoints(
            am, loss_split.discover_checkpoints(model_dir), stream[:loss_tokens], cfg, am_dir=model_dir
        )
        bigram = loss_dynamics.Bigram(loss_dynamics.training_documents(am.encode), am.vocab_size)
        return rows, loss_dynamics.transitions(rows), loss_dynamics.bigram_split(am, stream[:loss_tokens], cfg, bigram)

    rows, trans, bigram = timed("loss_split", dynamics)
    loss_dynamics.plot(rows, trans, bigram, figs / "loss_dynamics.png")
    out["sections"].append(loss_dynamics.markdown(rows, trans, bigram))
    out["findings"] += [t["finding"] for t in trans]
    out["results"]["loss_split"] = {"rows": rows, "transitions": trans, "bigram": bigram}

    layer = study_layer(am)
    cfg = steer_study.StudyConfig(layer, steer_prompts, steer_features, generate=GENERATE)
    s = timed("steering", lambda: steer_study.run(am, prompts, cfg, progress=True))
    steer_study.plot(s, figs / "steer_study.png")
    out["sections"].append(steer_study.markdown(s))
    out["findings"] += s["findings"]
    out["results"]["steering"] = s

    if getattr(am.tokenizer, "chat_template", None) is None:
        out["sections"].append("## Case study\n\nThe model has no chat template; the case study was not run.\n\n")
        return out
    try:
        c = timed("case_study", lambda: case_study.run(am, case_study.CaseConfig(layer), progress=True))
    except ValueError as e:  # e.g. the demo model knows no capitals: say so instead of a section of nothing
        out["sections"].append(f"## Case study\n\nNot run on this model: {e}.\n\n")
        return out
    case_study.plot(c, figs / "case_study.png")
    out["sections"].append(case_study.markdown(c))
    out["findings"] += c["findings"]
    out["results"]["case_study"] = c
    return out


def agreement(findings: list) -> str:
    """One line per finding: the statistic beside its null, the interval and the verdict; what each kind of finding
    measures is said once, before its first line."""
    lines, said = [], set()
    for f in findings:
        if f.what and f.what not in said:
            said.add(f.what)
            lines.append(f"- *{f.what[:1].upper() + f.what[1:]}:*")
        lo, hi = f.interval
        lines.append(
            f"  - {f.name}: {f.statistic:.4g} against {f.null:.4g} (95% interval [{lo:.4g}, {hi:.4g}]): **{f.verdict}**"
        )
    return "\n".join(lines) + "\n"
