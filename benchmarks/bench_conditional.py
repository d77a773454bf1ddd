"""Transformers-engine throughput of conditional edits (`when`) against a plain `add` and against no steering, in one
run.

On the demo model (float32, CPU, `--threads` threads): `--requests` concurrent greedy requests of `--tokens` tokens
each through HFEngine in-process (bench_server's EngineModes), every request steered at every position ("all") at
layer 1 by one edit of a kind, or unsteered (`none`): `add` (the baseline), `add` gated by a feature condition that
holds at some tokens (`when_add`) or never (`when_never`), a gated clamp, a gated project_out, a gated
norm-relative add, and `when_mix` (K = requests distinct conditional specs cycling through
those kinds). `add_pool1` is the plain add on a second engine whose condition pool is one column a layer
(`max_condition_columns` 1, default 32): the price every step pays for the pool. After a warm-up the kinds run in
turn `--repeats` times, interleaved; the table shows each kind's median tokens/s and its ratios to `add` and `none`.
Writes benchmarks/results/bench_conditional.json and benchmarks/results/conditional_vs_add.png.

    .venv/bin/python benchmarks/bench_conditional.py [--tokens 32] [--requests 16] [--threads 2] [--repeats 5]
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
from bench_projection import plot  # noqa: E402
from bench_server import EngineModes  # noqa: E402
from common import RESULTS, prompts, write_result  # noqa: E402

from functok_vllm.steering import SteeringLimits, SteeringSpec  # noqa: E402

FIRES = {"feature": 77, "above": 0.0}  # layer 1's feature 77 (the `calm` preset's): active at some tokens
NEVER = {"feature": 77, "below": 0.0}  # an activation is never below 0
EDITS = {  # kind -> the edit's fields besides layer and feature
    "add": {"strength": 8.0},
    "when_add": {"strength": 8.0, "when": FIRES},
    "when_never": {"strength": 8.0, "when": NEVER},
    "when_clamp": {"mode": "clamp", "value": 4.0, "when": FIRES},
    "when_project_out": {"mode": "project_out", "when": FIRES},
    "when_token_norm": {"strength": 0.2, "strength_unit": "token_norm", "when": FIRES},
}
MIXED = ["when_add", "when_clamp", "when_project_out", "when_token_norm"]


def specs(kind: str, n: int) -> list[SteeringSpec | None]:
    """n specs: one edit of `kind` on feature 100 at layer 1, none, or (`when_mix`) n distinct conditional ones."""
    if kind == "none":
        return [None] * n
    if kind == "when_mix":
        edits = [{"layer": 1, "feature": 100 + 37 * i, **EDITS[MIXED[i % len(MIXED)]]} for i in range(n)]
        return [SteeringSpec.from_dict({"edits": [e], "positions": "all"}) for e in edits]
    fields = EDITS["add" if kind == "add_pool1" else kind]
    return [SteeringSpec.from_dict({"edits": [{"layer": 1, "feature": 100, **fields}], "positions": "all"})] * n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ps = prompts(args.requests)
    engine = EngineModes(ps, [None] * args.requests, args.tokens, args.threads)
    small = SteeringLimits(max_conditions=1, max_condition_columns=1)
    pool1 = EngineModes(ps, [None] * args.requests, args.tokens, args.threads, steering=small)
    kinds = list(dict.fromkeys(["none", "add", *EDITS, "when_mix", "add_pool1"]))
    sets = {k: specs(k, args.requests) for k in kinds}

    def run(kind: str) -> int:
        eng = pool1 if kind == "add_pool1" else engine
        eng.ss = sets[kind]
        return eng.run(kind != "none")

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
        pool1.close()
    load["end"] = loadavg()
    res = {k: {"seconds": statistics.median(t), "all_seconds": t, "tokens": tokens[k]} for k, t in times.items()}
    for r in res.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    print(f"\n{args.requests} requests x {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"load average (1/5/15 min): start {load['start']}, end {load['end']}")
    print(f"{'kind':>17}{'tokens/s':>10}{'vs add':>8}{'range vs add':>15}{'vs none':>9}{'range vs none':>15}")
    runs = {k: [r["tokens"] / s for s in r["all_seconds"]] for k, r in res.items()}
    for k, r in res.items():
        for base in ("add", "none"):
            r[f"ratio_vs_{base}"] = r["tokens_per_s"] / res[base]["tokens_per_s"]
            r[f"range_vs_{base}"] = [min(runs[k]) / max(runs[base]), max(runs[k]) / min(runs[base])]
        a, n = r["range_vs_add"], r["range_vs_none"]
        print(
            f"{k:>17}{r['tokens_per_s']:>10.1f}{r['ratio_vs_add']:>8.3f}{a[0]:>9.3f}..{a[1]:.3f}"
            f"{r['ratio_vs_none']:>9.3f}{n[0]:>9.3f}..{n[1]:.3f}"
        )
    out = write_result("bench_conditional", {"args": vars(args), "loadavg": load, "results": res})
    title = f"functok-tiny, HF engine, conditional edits at every position, {args.requests} req x {args.tokens} tok"
    png = plot(res, RESULTS / "conditional_vs_add.png", title)
    print(f"wrote {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
