"""vLLM CPU throughput with the functok steering extension: unsteered vs K = 1, 4, 16 distinct specs in the batch.

Per compilation mode (eager, compiled), one child process holds two vLLM instances of the demo model: `stock` (no
extension) and `ext` (the worker extension loaded), and runs in turn

  stock        `--requests` greedy requests of exactly `--tokens` tokens on the stock instance
  unsteered    the same requests on the extension's instance, no steering
  K=1, 4, 16   the same requests, request i steered by spec i % K (adds at layers 1-2 on function tokens; every
               fourth spec also ablates a layer-1 feature at all positions, so the clamp path runs too)

After a warm-up pass the workloads run `--repeats` times interleaved (a busy spell on a shared machine hits each
alike; only one instance works at a time). The table shows generated tokens per second of the median and of the best
run, and ratios of both (on a shared machine interference only slows runs down). Prefix caching is off so every
repeat prefills. Writes benchmarks/results/bench_vllm-*.json (`--show FILE` prints a saved one's table).

    .venv/bin/python benchmarks/bench_vllm.py [--requests 32] [--tokens 32] [--repeats 15] [--modes eager,compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prompts, write_result  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "functok-tiny"
EXTENSION = "functok_vllm.engines.vllm.worker.SteeringWorkerExtension"
KS = (1, 4, 16)


def spec(i: int) -> dict:
    edits = [{"layer": 1 + i % 2, "feature": 100 + 37 * i, "strength": 6.0 + i}]
    if i % 4 == 3:
        edits.append({"layer": 1, "feature": 50 + i, "mode": "ablate"})
    return {"edits": edits, "positions": "all" if i % 4 == 3 else "function"}


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

    (stock, stock_init), (ext, ext_init) = make(False), make(True)
    ids = [{"prompt_token_ids": ext.get_tokenizer().encode(p)} for p in prompts(args.requests)]

    def params(k: int):
        extra = lambda i: {"steering": json.dumps(spec(i % k))} if k else None  # noqa: E731
        return [
            SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, extra_args=extra(i))
            for i in range(args.requests)
        ]

    workloads = {"stock": (stock, params(0)), "unsteered": (ext, params(0))}
    workloads |= {f"K={k}": (ext, params(k)) for k in KS}
    times: dict[str, list[float]] = {w: [] for w in workloads}
    for rep in range(args.repeats + 1):  # pass 0 warms up
        for name, (llm, ps) in workloads.items():
            t = time.perf_counter()
            outs = llm.generate(ids, ps, use_tqdm=False)
            dt = time.perf_counter() - t
            if any(len(o.outputs[0].token_ids) != args.tokens for o in outs):
                raise SystemExit(f"{name}: a request did not generate {args.tokens} tokens")
            if rep:
                times[name].append(dt)
    stats = ext.collective_rpc("functok_stats")[0]
    if stats["bad_specs"] or stats["slots_full"] or not stats["steered_tokens"]:  # a K=... row ran unsteered
        raise SystemExit(f"steering was not applied as asked, the steered timings mean nothing: {stats}")
    return {
        "mode": mode,
        "init_s": {"stock": stock_init, "ext": ext_init},
        "runs_s": {w: [round(t, 4) for t in ts] for w, ts in times.items()},
        "worker_stats": stats,
    }


def table(rows: list[dict], requests: int, tokens: int) -> None:
    """Print tokens/s (median and best run) and each workload's ratio to unsteered and to stock vLLM."""
    n = requests * tokens
    reps = len(rows[0]["runs_s"]["stock"])
    print(f"\n{requests} requests x {tokens} tokens, greedy, float32, {reps} runs each; ratios: median (best)")
    print(f"{'mode':<9} {'workload':<16} {'median tok/s':>12} {'best tok/s':>11} {'vs unsteered':>15} {'vs stock':>15}")
    for r in rows:
        med = {w: n / statistics.median(ts) for w, ts in r["runs_s"].items()}
        best = {w: n / min(ts) for w, ts in r["runs_s"].items()}
        r["tokens_per_s"] = {w: round(v, 1) for w, v in med.items()}
        r["best_tokens_per_s"] = {w: round(v, 1) for w, v in best.items()}
        for w in r["runs_s"]:
            label = {"stock": "stock vLLM", "unsteered": "unsteered (ext)"}.get(w, f"steered {w}")
            vs = {to: f"{med[w] / med[to]:.3f} ({best[w] / best[to]:.3f})" for to in ("unsteered", "stock")}
            vs["unsteered"] = "" if w == "stock" else vs["unsteered"]
            print(
                f"{r['mode']:<9} {label:<16} {med[w]:>12.1f} {best[w]:>11.1f} {vs['unsteered']:>15} {vs['stock']:>15}"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a mode: run it here, print JSON
    ap.add_argument("--show", default=None, help="print the table of a saved results JSON and exit")
    args = ap.parse_args()
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        table(saved["runs"], saved["config"]["requests"], saved["config"]["tokens"])
        return 0
    common = ["--requests", str(args.requests), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return 0

    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    rows = []
    for mode in args.modes.split(","):
        print(f"[bench_vllm] {mode} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, *common], env=env, capture_output=True, text=True
        )
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.stderr.write(out.stderr[-4000:])
            return 1
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))

    table(rows, args.requests, args.tokens)
    meta = {"requests": args.requests, "tokens": args.tokens, "repeats": args.repeats}
    path = write_result("bench_vllm", {"config": meta, "runs": rows}, stamp=True)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
