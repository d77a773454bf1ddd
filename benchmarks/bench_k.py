"""Transformers-engine throughput against the number K of distinct steering specs in one batch.

One run on the demo model (float32, CPU, `--threads` threads): `--requests` concurrent greedy requests of `--tokens`
tokens each through HFEngine in-process (bench_server's EngineModes), unsteered (K = 0) or steered with K distinct
specs spread round-robin over the requests. Spec i is one `add` edit on feature 100 + 37 i at layer 1, positions
"all", so every token of every steered request is steered. K = requests is the most a batch can hold.

Every request generates exactly `--tokens` tokens (ignore_eos). After a warm-up, the K values run in turn `--repeats`
times (interleaved, so a busy spell on a shared machine hits every K alike); the table shows each K's median and its
ratio to K = 0. Writes benchmarks/results/bench_k.json and benchmarks/results/throughput_vs_k.png.

    .venv/bin/python benchmarks/bench_k.py [--tokens 32] [--requests 16] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import EngineModes  # noqa: E402
from common import RESULTS, prompts, write_result  # noqa: E402

from functok_vllm.steering import SteeringSpec  # noqa: E402


def k_specs(k: int, n: int) -> list[SteeringSpec]:
    """n specs holding k distinct ones (round-robin): spec i adds feature 100 + 37 i at layer 1 on every position."""
    distinct = [
        SteeringSpec.from_dict(
            {"edits": [{"layer": 1, "feature": 100 + 37 * i, "mode": "add", "strength": 8.0}], "positions": "all"}
        )
        for i in range(k)
    ]
    return [distinct[i % k] for i in range(n)]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def plot(res: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(res, key=int)
    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=100)
    xs = list(range(len(ks)))
    ax.plot(xs, [res[k]["tokens_per_s"] for k in ks], "o-", label="median")
    for x, k in zip(xs, ks, strict=True):
        runs = [res[k]["tokens"] / s for s in res[k]["all_seconds"]]
        ax.scatter([x] * len(runs), runs, s=10, color="gray", alpha=0.6, label="runs" if x == 0 else None)
    ax.set_xticks(xs, [f"K={k}" for k in ks])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("tokens/s")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 4, 16])
    args = ap.parse_args()
    if any(k < 0 or k > args.requests for k in args.ks):
        ap.error(f"every K must be in 0..{args.requests}")
    torch.set_num_threads(args.threads)
    ps = prompts(args.requests)
    engine = EngineModes(ps, [None] * args.requests, args.tokens, args.threads)
    spec_sets = {k: k_specs(k, args.requests) if k else None for k in args.ks}

    def run(k: int) -> int:
        if not k:
            return engine.run(False)
        engine.ss = spec_sets[k]
        return engine.run(True)

    times: dict[int, list[float]] = {k: [] for k in args.ks}
    tokens: dict[int, int] = {}
    load = {"start": loadavg()}
    stats0 = engine.engine.stats()
    try:
        for k in args.ks:  # warm-up
            run(k)
        for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every K alike
            for k in args.ks:
                t = time.perf_counter()
                tokens[k] = run(k)
                times[k].append(time.perf_counter() - t)
    finally:
        engine.close()
    load["end"] = loadavg()
    stats1 = engine.engine.stats()
    steps = stats1["decode_steps"] - stats0["decode_steps"]
    mean_batch = (stats1["decode_rows"] - stats0["decode_rows"]) / max(steps, 1)
    res = {str(k): {"seconds": statistics.median(t), "all_seconds": t, "tokens": tokens[k]} for k, t in times.items()}
    for r in res.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    base = res[str(args.ks[0])]["tokens_per_s"]
    for r in res.values():
        r["ratio_vs_first"] = r["tokens_per_s"] / base
    print(f"\n{args.requests} requests x {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"engine: mean decode batch {mean_batch:.2f} requests over {steps} decode steps")
    print(f"load average (1/5/15 min): start {load['start']}, end {load['end']}")
    print(f"{'K':>4}{'seconds':>10}{'tokens/s':>12}{'vs K=' + str(args.ks[0]):>10}")
    for k, r in res.items():
        print(f"{k:>4}{r['seconds']:>10.3f}{r['tokens_per_s']:>12.1f}{r['ratio_vs_first']:>10.3f}")
    payload = {"args": vars(args), "loadavg": load, "mean_decode_batch": mean_batch, "results": res}
    out = write_result("bench_k", payload)
    title = f"functok-tiny, HF engine, {args.requests} req x {args.tokens} tok, {args.threads} threads"
    png = plot(res, RESULTS / "throughput_vs_k.png", title)
    print(f"wrote {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
