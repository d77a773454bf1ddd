"""Coverage against SAE width and against tokens, beside its nulls (issue 22, item 2): train SAEs of several widths at
one layer with the project's trainer on the training split, then measure coverage on every held-out token.

    PYTHONPATH=. python scripts/coverage_width.py --model ~/.cache/functok/models/SmolLM2-135M-Instruct \
        --layer 7 --expansions 1 2 4 8 --train-tokens 65536 --steps 300

SAE weights go under ~/.cache/functok/width_saes/MODEL/ (out of git); the numbers (width.json) and the figure
(coverage_width.png) under --out. The training split and the held-out split share no document, so the coverage run
never sees a token the SAEs were trained on. Each width is written as soon as it is done (a run cut short keeps them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from functok_vllm.analysis import coverage, coverage_null
from functok_vllm.analysis.data import token_stream
from functok_vllm.analysis.model import function_token_mask, load_function_tokens
from functok_vllm.core import SAE
from functok_vllm.core.capture import CoverageCapture
from functok_vllm.engines.hf.hooks import load_model
from functok_vllm.paths import shipped_function_tokens
from functok_vllm.train.sae_train import collect_residuals, config_for, train_one, training_windows

SEQ = 256
BATCH = 8  # windows a capture step


def capture(sae: SAE, layer: int, ids: torch.Tensor, acts: torch.Tensor, fn, vocab: int, eos: int, bos: int):
    """{layer: EdgeBits} from stored residuals: ids (windows, SEQ), acts (windows * SEQ, d_model)."""
    cap = CoverageCapture({layer: sae}, [layer], vocab, eos, "cpu", fn, bos)
    pos = torch.arange(SEQ).repeat(BATCH)
    for w in range(0, ids.shape[0], BATCH):
        batch = ids[w : w + BATCH].reshape(-1)
        h = acts[w * SEQ : w * SEQ + len(batch)].float()
        cap.observe(layer, batch, h, pos[: len(batch)])
    return cap.graphs


def point(g, fn, decode, nulls) -> dict:
    s = coverage.summarize(g, fn, decode, nulls)
    (layer,) = s["layers"]
    nl = s["nulls"][layer]
    out = {"tokens": s["tokens"], "sinks": nl["sinks_excluded"], "function_share": nl["function_share"]}
    for m, b in nl["by_m"].items():
        f = nl["findings"][f"coverage_m{m}"]
        keep = ("features", "function_coverage", "interval", "analytic", "random_mean", "random_band", "p_value")
        out[f"m{m}"] = {k: b[k] for k in keep} | {"verdict": f.verdict}
    if "enrichment" in nl["findings"]:
        out["enrichment"] = nl["findings"]["enrichment"].to_json()
    return out


def plot(res: dict, path: Path) -> None:
    from functok_vllm.analysis.io import figure, save_figure

    fig, (a1, a2) = figure(2, width=5.0)
    widths = sorted(res["widths"], key=int)
    for m, ls in (("m1", "-"), (f"m{res['m']}", ":")):
        x = [int(w) for w in widths]
        a1.plot(
            x,
            [res["widths"][w]["all"][m]["function_coverage"] for w in widths],
            "C3" + ls,
            marker="o",
            label=f"function tokens ({m})",
        )
        a1.plot(
            x,
            [res["widths"][w]["all"][m]["random_mean"] for w in widths],
            "C0" + ls,
            marker="o",
            label=f"random content sets ({m})",
        )
        a1.fill_between(
            x, *zip(*[res["widths"][w]["all"][m]["random_band"] for w in widths], strict=True), color="C0", alpha=0.2
        )
        a1.plot(x, [res["widths"][w]["all"][m]["analytic"] for w in widths], "k" + ls, label=f"analytic ({m})")
    a1.set_xscale("log")
    a1.set_xlabel("SAE width (d_sae)")
    a1.set_ylabel("coverage of reached features")
    a1.set_title(f"layer {res['layer']}: coverage vs width")
    a1.legend(fontsize=6)
    for w in widths:
        pts = res["widths"][w]["tokens"]
        x = [p["tokens"] for p in pts]
        a2.plot(x, [p["m1"]["function_coverage"] for p in pts], marker="o", label=f"d_sae {w}: function")
        a2.plot(x, [p["m1"]["random_mean"] for p in pts], ls="--", color=a2.lines[-1].get_color(), label="random")
    a2.set_xscale("log")
    a2.set_xlabel("held-out tokens analysed")
    a2.set_title("coverage (m = 1) vs tokens")
    a2.legend(fontsize=6)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--expansions", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--train-tokens", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--k", type=int, default=48)
    ap.add_argument("--m", type=int, default=10, help="the larger firing threshold reported beside m = 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="analysis/SmolLM2-135M-Instruct/width")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model(args.model)
    name = Path(args.model).name
    cfg = config_for(
        name,
        model.config.num_hidden_layers,
        layers=(args.layer,),
        activation_tokens=args.train_tokens,
        steps=args.steps,
        k=args.k,
        fwd_batch=8,
        seq_len=SEQ,
    )
    vocab = model.get_output_embeddings().weight.shape[0]
    fn = function_token_mask(load_function_tokens(shipped_function_tokens(Path(args.model))), vocab)

    def encode(text):
        return tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    eos = -1 if tok.eos_token_id is None else tok.eos_token_id
    bos = -1 if tok.bos_token_id is None else tok.bos_token_id
    stream = token_stream(encode, eos, None, None)
    n_win = len(stream) // SEQ
    held = stream[: n_win * SEQ].view(n_win, SEQ)
    train = training_windows(tok, cfg)
    t = time.time()
    acts_train = collect_residuals(model, train, cfg)[args.layer]
    acts_held = collect_residuals(model, held, cfg)[args.layer]
    collect_s = time.time() - t
    del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "model": name,
        "layer": args.layer,
        "m": args.m,
        "train_tokens": int(train.numel()),
        "heldout_tokens": int(held.numel()),
        "collect_seconds": round(collect_s, 1),
        "steps": args.steps,
        "k": args.k,
        "threads": args.threads,
        "widths": {},
    }
    nulls = coverage_null.NullConfig(min_firings=(1, args.m))
    for e in tqdm(args.expansions, desc="widths"):
        t = time.time()
        sae, stats = train_one(acts_train, replace_cfg(cfg, e), args.layer, name, "cpu", progress=True)
        train_s = time.time() - t
        sae.save(Path.home() / ".cache/functok/width_saes" / name / f"x{e}" / f"layer_{args.layer}")
        t = time.time()
        pts = []
        for frac in (8, 4, 2, 1):
            w = max(1, n_win // frac)
            g = capture(sae, args.layer, held[:w], acts_held, fn, vocab, eos, bos)
            pts.append(point(g, fn, lambda i: tok.decode(i), nulls))
        res["widths"][str(sae.d_sae)] = {
            "expansion": e,
            "train_seconds": round(train_s, 1),
            "final_nmse": stats.get("final_nmse"),
            "dead_at_end": stats.get("dead_at_end"),
            "coverage_seconds": round(time.time() - t, 1),
            "all": pts[-1],
            "tokens": pts,
        }
        res["total_seconds"] = round(time.time() - t0, 1)
        (out / "width.json").write_text(json.dumps(res, indent=1) + "\n")
        plot(res, out / "coverage_width.png")
        print(json.dumps({k: v for k, v in res["widths"][str(sae.d_sae)].items() if k != "tokens"}), flush=True)


def replace_cfg(cfg, expansion: int):
    from dataclasses import replace

    return replace(cfg, expansion=expansion)


if __name__ == "__main__":
    main()
