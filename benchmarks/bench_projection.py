"""Transformers-engine throughput of projection edits and norm-relative adds against a plain `add`, in one run.

On the demo model (float32, CPU, `--threads` threads): `--requests` concurrent greedy requests of `--tokens` tokens
each through HFEngine in-process (bench_server's EngineModes), every request steered at every position ("all") at
layer 1 by one edit of a kind: `add` (the baseline), `project_out`, `cap`, `set`, `add` with
`strength_unit: "token_norm"`, and `mix` (K = requests distinct specs cycling through those kinds). After a warm-up the
kinds run in turn `--repeats` times, interleaved; the table shows each kind's median tokens/s and its ratio to `add`.
Writes benchmarks/results/bench_projection.json and benchmarks/results/projection_vs_add.png.

    .venv/bin/python benchmarks/bench_projection.py [--tokens 32] [--requests 16] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_k import loadavg  # noqa: E402
from bench_server import EngineModes  # noqa: E402
from common import RESULTS, prompts, write_result  # noqa: E402

from functok_vllm.steering import SteeringSpec  # noqa: E402

EDITS = {  # kind -> the edit's fields besides layer and feature
    "add": {"strength": 8.0},
    "project_out": {"mode": "project_out"},
    "cap": {"mode": "cap", "min": -0.5, "max": 0.5},
    "set": {"mode": "set", "value": 1.0},
    "token_norm": {"strength": 0.2, "strength_unit": "token_norm"},
}


def specs(kind: str, n: int) -> list[SteeringSpec]:
    """n specs: one edit of `kind` on feature 100 at layer 1, or (`mix`) n distinct ones cycling through the kinds."""
    kinds = list(EDITS) if kind == "mix" else [kind]
    return [
        SteeringSpec.from_dict(
            {"edits": [{"layer": 1, "feature": 100 + 37 * i, **EDITS[kinds[i % len(kinds)]]}], "positions": "all"}
        )
        if kind == "mix"
        else SteeringSpec.from_dict({"edits": [{"layer": 1, "feature": 100, **EDITS[kind]}], "positions": "all"})
        for i in range(n)
    ]


def plot(res: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.0), dpi=100)
    kinds = list(res)
    ax.bar(range(len(kinds)), [res[k]["tokens_per_s"] for k in kinds], color="tab:blue")
    for x, k in enumerate(kinds):
        runs = [res[k]["tokens"] / s for s in res[k]["all_seconds"]]
        ax.scatter([x] * len(runs), runs, s=10, color="black", zorder=3)
    ax.set_xticks(range(len(kinds)), kinds, fontsize=7)
    ax.set_ylabel("tokens/s (bars: median, dots: runs)")
    ax.set_title(title, fontsize=8)
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = EngineModes(prompts(args.requests), [None] * args.requests, args.tokens, args.threads)
    kinds = [*EDITS, "mix"]
    sets = {k: specs(k, args.requests) for k in kinds}

    def run(kind: str) -> int:
        engine.ss = sets[kind]
        return engine.run(True)

    times: dict[str, list[float]] = {k: [] for k in kinds}
    tokens: dict[str, int] = {}
    load = {"start": loadavg()}
    try:
        for k in kinds:  # warm-up
            run(k)
        for _ in tqdm(range(args.repeats), desc="repeats"):  # interleaved: a busy spell hits every kind alike
            for k in kinds:
                t = time.perf_counter()
                tokens[k] = run(k)
                times[k].append(time.perf_counter() - t)
    finally:
        engine.close()
    load["end"] = loadavg()
    res = {k: {"seconds": statistics.median(t), "all_seconds": t, "tokens": tokens[k]} for k, t in times.items()}
    for r in res.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["ratio_vs_add"] = r["tokens_per_s"] / (res["add"]["tokens"] / res["add"]["seconds"])
    print(f"\n{args.requests} requests x {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"load average (1/5/15 min): start {load['start']}, end {load['end']}")
    print(f"{'kind':>12}{'seconds':>10}{'tokens/s':>12}{'vs add':>10}{'min..max vs add':>20}")
    add_runs = [res["add"]["tokens"] / s for s in res["add"]["all_seconds"]]
    for k, r in res.items():
        runs = [r["tokens"] / s for s in r["all_seconds"]]
        lo, hi = min(runs) / max(add_runs), max(runs) / min(add_runs)
        r["ratio_range"] = [lo, hi]
        print(f"{k:>12}{r['seconds']:>10.3f}{r['tokens_per_s']:>12.1f}{r['ratio_vs_add']:>10.3f}{lo:>10.3f}..{hi:.3f}")
    out = write_result("bench_projection", {"args": vars(args), "loadavg": load, "results": res})
    title = f"functok-tiny, HF engine, every position steered, {args.requests} req x {args.tokens} tok"
    png = plot(res, RESULTS / "projection_vs_add.png", title)
    print(f"wrote {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
