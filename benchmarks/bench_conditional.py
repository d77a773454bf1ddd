"""Transformers-engine throughput of conditional edits (`when`) against a plain `add` and against no steering, in one
run.

On the demo model (float32, CPU, `--threads` threads): `--requests` concurrent greedy requests of `--tokens` tokens each
through HFEngine in-process (bench_server's EngineModes), every request steered at every position ("all") at layer 1 by
one edit of a kind, or unsteered (`none`): `add` (the baseline), `add` gated by a feature condition that holds at about
half the tokens (`when_add`) or never (`when_never`), a gated clamp, a gated project_out, a gated norm-relative add, and
`when_mix` (K = requests distinct conditional specs cycling through those kinds). `add_pool1` is the plain add on a
second engine whose condition pool is one column a layer (`max_condition_columns` 1, default 32): the price every step
pays for the pool. After a warm-up the kinds run in turn `--repeats` times, interleaved; the table shows each kind's
median tokens/s and its ratios to `add` and `none`.

The op alone, too (`op` in the JSON): the steering update `SteeringLayer.delta` at layer 1 of the demo SAEs on
`--op-tokens` tokens (d_model 256), each kind's spec owning every token, `--op-threads` threads, the fastest of
`--op-repeats` interleaved timings of 20 calls each (the fastest: other jobs on a shared machine only ever add time).
Ratios there resolve what end-to-end throughput on a loaded 2-core machine cannot.
Writes benchmarks/results/bench_conditional.json and benchmarks/results/conditional_vs_add.png.

    .venv/bin/python benchmarks/bench_conditional.py [--tokens 32] [--requests 16] [--threads 2] [--repeats 5]
        [--op-tokens 512] [--op-repeats 30] [--op-threads 1]
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

from functok_vllm.core import SAE, SteeringTable  # noqa: E402
from functok_vllm.paths import DEMO_SAES  # noqa: E402
from functok_vllm.steering import SteeringLimits, SteeringSpec  # noqa: E402

FIRES = {"feature": 1746, "above": 0.0}  # layer 1's feature 1746: above 0 at about half the prompts' tokens
NEVER = {"feature": 1746, "below": 0.0}  # an activation is never below 0
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


def plot(res: dict, op: dict, out: Path, title: str) -> Path:
    """Two panels: end-to-end tokens/s by kind (bars: median, dots: runs), and the op's time per call by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9.0, 3.4), dpi=100)
    kinds = list(res)
    a.bar(range(len(kinds)), [res[k]["tokens_per_s"] for k in kinds], color="tab:blue")
    for x, k in enumerate(kinds):
        runs = [res[k]["tokens"] / s for s in res[k]["all_seconds"]]
        a.scatter([x] * len(runs), runs, s=10, color="black", zorder=3)
    a.set_ylabel("tokens/s (bars: median, dots: runs)")
    a.set_title("engine, end to end", fontsize=8)
    b.bar(range(len(op)), [1e6 * t for t in op.values()], color="tab:orange")
    b.set_ylabel("us per call (fastest)")
    b.set_title("the op at one layer", fontsize=8)
    for ax, names in ((a, kinds), (b, list(op))):
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=35, ha="right")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def op_times(kinds: list[str], n_specs: int, tokens: int, repeats: int) -> dict:
    """{kind: fastest seconds per `delta` call} at layer 1, every token owned by the kind's spec(s); one table per
    kind, the kinds timed in turn in each repeat (a busy spell hits every kind alike)."""
    saes = {sae.layer: sae for sae in (SAE.load(p) for p in sorted(DEMO_SAES.glob("layer_*")))}
    torch.manual_seed(0)
    h = 3 * torch.randn(tokens, saes[1].d_in)  # (tokens, d_model)
    ops = {}
    for kind in kinds:
        table = SteeringTable(saes, max_slots=n_specs + 1, max_conditions=1 if kind == "add_pool1" else 32)
        slots = torch.tensor([table.acquire(s) for s in specs(kind, n_specs)])
        table.set_slot_index(slots.repeat_interleave(-(-tokens // len(slots)))[:tokens])
        ops[kind] = (table, table.layers[1])
    best = dict.fromkeys(kinds, float("inf"))
    with torch.no_grad():
        for _ in tqdm(range(repeats), desc="op"):
            for kind, (_table, op) in ops.items():
                t = time.perf_counter()
                for _ in range(20):
                    op.delta(h)
                best[kind] = min(best[kind], (time.perf_counter() - t) / 20)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--op-tokens", type=int, default=512)
    ap.add_argument("--op-repeats", type=int, default=30)
    ap.add_argument("--op-threads", type=int, default=1)
    args = ap.parse_args()
    kinds = list(dict.fromkeys(["none", "add", *EDITS, "when_mix", "add_pool1"]))
    torch.set_num_threads(args.op_threads)
    op = op_times(kinds, args.requests, args.op_tokens, args.op_repeats)
    torch.set_num_threads(args.threads)
    print(f"\nthe op at layer 1, {args.op_tokens} tokens, {args.op_threads} thread(s), best of {args.op_repeats} x 20")
    print(f"{'kind':>17}{'us/call':>10}{'vs add':>8}{'vs none':>9}")
    for k, t in op.items():
        print(f"{k:>17}{1e6 * t:>10.1f}{t / op['add']:>8.3f}{t / op['none']:>9.3f}")
    ps = prompts(args.requests)
    engine = EngineModes(ps, [None] * args.requests, args.tokens, args.threads)
    small = SteeringLimits(max_conditions=1, max_condition_columns=1)
    pool1 = EngineModes(ps, [None] * args.requests, args.tokens, args.threads, steering=small)
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
    out = write_result("bench_conditional", {"args": vars(args), "loadavg": load, "results": res, "op": op})
    title = f"functok-tiny, HF engine, conditional edits at every position, {args.requests} req x {args.tokens} tok"
    png = plot(res, op, RESULTS / "conditional_vs_add.png", title)
    print(f"wrote {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
