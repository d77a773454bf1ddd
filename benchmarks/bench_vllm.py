"""vLLM CPU throughput with the functok steering extension: unsteered vs K distinct specs (`--suite k`), or each edit
kind (plain add, conditional add, project_out, cap, norm-relative add, a mix of all five) against a plain add
(`--suite ops`).

Per compilation mode (eager, compiled), one child process holds the vLLM instances of the demo model it needs:
`stock` (no extension, suite k only) and `ext` (the worker extension loaded), and runs in turn

  suite k:     stock        `--requests` greedy requests of exactly `--tokens` tokens on the stock instance
               unsteered    the same requests on the extension's instance, no steering
               K=1, 4, 16   request i steered by spec i % K (adds at layers 1-2 on function tokens; every fourth
                            spec also ablates a layer-1 feature at all positions, so the clamp path runs too)
  suite ops:   unsteered, then every request steered at every position (`all`) at layer 1 by one edit of a kind:
               add (the baseline), when_add (an add gated by layer 1's feature 1746 > 0: about half the tokens),
               project_out, cap, token_norm (strength in units of the token's norm); `mix K=16`: 16 distinct specs,
               each one edit of each of the five kinds on its own features; `mix K=1`: one such spec for every request
               (the same work per token as K=16: only the number of distinct specs differs)

After a warm-up pass the workloads run `--repeats` times interleaved (a busy spell on a shared machine hits each
alike; only one instance works at a time). The table shows generated tokens per second of the median and of the best
run, ratios of both to the baselines, and against the first baseline the paired per-repeat ratios (repeat r of a
workload against repeat r of the baseline): their median with a 95% bootstrap interval and their range (the spread);
then K = 16 against K = 1 the same way. The null is equal speed: a ratio whose interval holds 1 is no difference.
A steered workload whose runs left the worker's applied-token counter unchanged, or that met a refused spec or a
full steering table, stops the run: its timing would not be of steering.
Prefix caching is off so every repeat prefills. Writes benchmarks/results/bench_vllm[_ops]-*.json, and for ops a plot
(`--show FILE` prints a saved one's table).

    .venv/bin/python benchmarks/bench_vllm.py [--suite k|ops] [--requests 32] [--tokens 32] [--repeats 15]
        [--modes eager,compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, prompts, write_result  # noqa: E402
from tqdm import tqdm  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "functok-tiny"
EXTENSION = "functok_vllm.engines.vllm.worker.SteeringWorkerExtension"
KS = (1, 4, 16)
FIRES = {"feature": 1746, "above": 0.0}  # layer 1's feature 1746: active at 51% of the prompts' unsteered tokens
OPS = {  # suite ops: kind -> one edit's fields besides layer and feature (bench_conditional's and bench_projection's)
    "add": {"strength": 8.0},
    "when_add": {"strength": 8.0, "when": FIRES},
    "project_out": {"mode": "project_out"},
    "cap": {"mode": "cap", "min": -0.5, "max": 0.5},
    "token_norm": {"strength": 0.2, "strength_unit": "token_norm"},
}


def spec(i: int) -> dict:
    edits = [{"layer": 1 + i % 2, "feature": 100 + 37 * i, "strength": 6.0 + i}]
    if i % 4 == 3:
        edits.append({"layer": 1, "feature": 50 + i, "mode": "ablate"})
    return {"edits": edits, "positions": "all" if i % 4 == 3 else "function"}


def op_spec(kind: str, i: int = 0) -> dict:
    """One edit of `kind` on feature 100 at layer 1, every position; "mix": one edit of each kind, spec i's own
    features (i = 0..15 give 16 distinct specs)."""
    if kind == "mix":
        edits = [{"layer": 1, "feature": 100 + 37 * i + j, **f} for j, f in enumerate(OPS.values())]
    else:
        edits = [{"layer": 1, "feature": 100, **OPS[kind]}]
    return {"edits": edits, "positions": "all"}


def workloads(suite: str) -> dict:
    """name -> the spec of request i (a function), or None for unsteered; "stock" runs without the extension."""
    if suite == "k":
        return {"stock": None, "unsteered": None} | {f"K={k}": (lambda i, k=k: spec(i % k)) for k in KS}
    out = {"unsteered": None} | {kind: (lambda i, kind=kind: op_spec(kind)) for kind in OPS}
    return out | {"mix K=16": lambda i: op_spec("mix", i % 16), "mix K=1": lambda i: op_spec("mix")}


def baselines(names) -> list[str]:
    """The workloads each row is compared with, the first also for the paired spread."""
    return [b for b in ("add", "unsteered", "stock") if b in names]


def child(mode: str, args) -> dict:
    """Runs in a subprocess: both instances, every workload; seconds per run."""
    from vllm import LLM, SamplingParams

    def make(extension: bool):
        t0 = time.perf_counter()
        llm = LLM(
            model=str(MODEL),
            dtype="float32",
            max_model_len=256,
            max_num_seqs=args.requests,
            enforce_eager=mode == "eager",
            enable_prefix_caching=False,
            seed=0,
            worker_extension_cls=EXTENSION if extension else "",
        )
        return llm, round(time.perf_counter() - t0, 1)

    plan = workloads(args.suite)
    stock, stock_init = make(False) if "stock" in plan else (None, None)
    ext, ext_init = make(True)
    ids = [{"prompt_token_ids": ext.get_tokenizer().encode(p)} for p in prompts(args.requests)]

    def params(of):
        extra = lambda i: {"steering": json.dumps(of(i))} if of else None  # noqa: E731
        return [
            SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, extra_args=extra(i))
            for i in range(args.requests)
        ]

    jobs = {w: (stock if w == "stock" else ext, params(of), of is not None) for w, of in plan.items()}
    times: dict[str, list[float]] = {w: [] for w in jobs}
    applied: dict[str, list[int]] = {w: [] for w, job in jobs.items() if job[2]}
    stats = lambda: ext.collective_rpc("functok_stats")[0]  # noqa: E731
    for rep in tqdm(range(args.repeats + 1), desc=f"{mode} passes (0 warms up)", file=sys.stderr):
        for name, (llm, ps, steered) in jobs.items():
            before = stats() if steered else None
            t = time.perf_counter()
            outs = llm.generate(ids, ps, use_tqdm=False)
            dt = time.perf_counter() - t
            if any(len(o.outputs[0].token_ids) != args.tokens for o in outs):
                raise SystemExit(f"{name}: a request did not generate {args.tokens} tokens")
            if steered:  # the worker applied it: its counter moved, no spec refused, no request left unsteered
                after = stats()
                moved = after["steered_tokens"] - before["steered_tokens"]
                if moved <= 0 or any(after[k] != before[k] for k in ("bad_specs", "slots_full")):
                    raise SystemExit(f"{name}: steering was not applied as asked, its timing means nothing: {after}")
                applied[name].append(moved)
            if rep:
                times[name].append(dt)
    return {
        "mode": mode,
        "init_s": {"stock": stock_init, "ext": ext_init},
        "runs_s": {w: [round(t, 4) for t in ts] for w, ts in times.items()},
        "applied_tokens": {w: a[-1] for w, a in applied.items()},  # per pass: positions where an edit acted
        "worker_stats": stats(),
    }


def paired(runs: dict, w: str, base: str, n: int = 2000) -> tuple[float, float, float]:
    """Speed of `w` over `base` from their interleaved runs (repeat r against repeat r): the median of the paired
    ratios and its 95% bootstrap interval (resampling repeats, seed 0). Null: equal speed, 1 inside the interval."""
    ratios = [b / a for a, b in zip(runs[w], runs[base], strict=True)]  # times: base / w is w's speed over base's
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return statistics.median(ratios), meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def table(rows: list[dict], requests: int, tokens: int) -> None:
    """Print tokens/s (median and best run), each workload's ratios to the baselines, the paired ratio to the first
    baseline with its interval and range, and K = 16 against K = 1."""
    n = requests * tokens
    reps = len(next(iter(rows[0]["runs_s"].values())))
    bases = baselines(rows[0]["runs_s"])
    print(f"\n{requests} requests x {tokens} tokens, greedy, float32, {reps} runs each; ratios: median (best)")
    head = "".join(f" {'vs ' + b:>15}" for b in bases)
    paired_head = f"paired vs {bases[0]} [95% CI]"
    print(
        f"{'mode':<9} {'workload':<20} {'median tok/s':>12} {'best tok/s':>11}{head} {paired_head:>26} "
        f"{'range':>9} applied"
    )
    for r in rows:
        runs = r["runs_s"]
        med = {w: n / statistics.median(ts) for w, ts in runs.items()}
        best = {w: n / min(ts) for w, ts in runs.items()}
        r["tokens_per_s"] = {w: round(v, 1) for w, v in med.items()}
        r["best_tokens_per_s"] = {w: round(v, 1) for w, v in best.items()}
        for w in runs:
            label = {"stock": "stock vLLM", "unsteered": "unsteered (ext)"}.get(w, f"steered {w}")
            vs = "".join(f" {med[w] / med[b]:>7.3f} ({best[w] / best[b]:.3f})" for b in bases)
            ratios = [b / a for a, b in zip(runs[w], runs[bases[0]], strict=True)]  # time ratio = speed ratio
            m, lo, hi = paired(runs, w, bases[0])
            ci = f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if w != bases[0] else ""
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if w != bases[0] else ""
            done = r.get("applied_tokens", {}).get(w, "")
            print(f"{r['mode']:<9} {label:<20} {med[w]:>12.1f} {best[w]:>11.1f}{vs} {ci:>26} {spread:>9} {done}")
        k16, k1 = ("mix K=16", "mix K=1") if "mix K=1" in runs else ("K=16", "K=1")
        m, lo, hi = paired(runs, k16, k1)
        verdict = "no difference resolved" if lo <= 1 <= hi else ("K = 16 slower" if hi < 1 else "K = 16 faster")
        print(f"{r['mode']:<9} {k16} over {k1}, paired: {m:.3f} [{lo:.3f}, {hi:.3f}]: {verdict}")


def plot(rows: list[dict], requests: int, tokens: int, out: Path) -> Path:
    """One panel per mode: tokens/s of each workload, bars the median, dots every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 3.6), dpi=100, squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        names = list(r["runs_s"])
        speeds = [[requests * tokens / t for t in r["runs_s"][w]] for w in names]
        ax.bar(range(len(names)), [statistics.median(s) for s in speeds], color="#9ab")
        for k, s in enumerate(speeds):
            ax.plot([k] * len(s), s, "k.", ms=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"vLLM {r['mode']}: tokens/s (bar: median, dots: runs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--suite", choices=("k", "ops"), default="k")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a mode: run it here, print JSON
    ap.add_argument("--show", default=None, help="print the table of a saved results JSON and exit")
    args = ap.parse_args()
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        table(saved["runs"], saved["config"]["requests"], saved["config"]["tokens"])
        return 0
    common = ["--requests", str(args.requests), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    common += ["--suite", args.suite]
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return 0

    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    rows = []
    for mode in args.modes.split(","):
        print(f"[bench_vllm] {mode} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, *common], env=env, stdout=subprocess.PIPE, text=True
        )  # the child's stderr (vLLM's log, the progress bar) passes through
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"[bench_vllm] {mode} failed (exit {out.returncode}); see its log above", file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))

    table(rows, args.requests, args.tokens)
    meta = {"requests": args.requests, "tokens": args.tokens, "repeats": args.repeats, "suite": args.suite}
    name = "bench_vllm" if args.suite == "k" else "bench_vllm_ops"
    path = write_result(name, {"config": meta, "runs": rows}, stamp=True)
    print(f"\nwrote {path}")
    if args.suite == "ops":
        print(f"plot: {plot(rows, args.requests, args.tokens, RESULTS / 'vllm_ops_vs_add.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
