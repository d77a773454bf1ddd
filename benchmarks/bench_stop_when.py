"""What a `stop_when` "stop" request costs on the vLLM engine: a batch with one beside plain ones, against all plain.

`functok serve --engine vllm` on the demo model (float32, CPU, eager: `--compiled` for vLLM's compiled graph), one
server for the run. Each round sends `--requests` concurrent greedy completions of exactly `--tokens` tokens
(`ignore_eos`) in one of three modes: `plain` (none watches), `one_stop` (request 0 carries a "stop" monitor on layer
0's feature 3 whose threshold is never reached, so it runs to the end and every one of its deltas is checked),
`one_flag` (the same monitor with action "flag": the same worker-side readout, values fetched once at the end, so
`one_stop` against `one_flag` is the per-delta `collective_rpc` and hold-back alone), `all_stop` (every request
carries the "stop" monitor).
After a warm-up the modes run in turn `--repeats` times, interleaved; the table shows each mode's median round
tokens/s and its ratio to `plain` (with the quartiles of each round's ratio to the plain round run just before it:
the spread the load leaves), and the median time of request 0 (the watched one) against `plain`'s request 0.
The load average before and after goes into the JSON (2 shared cores: other jobs only ever add time).
Writes benchmarks/results/bench_stop_when.json and benchmarks/results/stop_when_cost.png.

    .venv/bin/python benchmarks/bench_stop_when.py [--tokens 32] [--requests 8] [--repeats 5] [--compiled]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_k import loadavg  # noqa: E402
from common import RESULTS, prompts, write_result  # noqa: E402

from functok_vllm.launch import functok_serve, start  # noqa: E402
from functok_vllm.paths import DEMO_MODEL  # noqa: E402

NEVER = {"feature": {"layer": 0, "feature": 3}, "above": 1e6, "tokens": 2, "action": "stop"}  # never reached
MODES = ("plain", "one_flag", "one_stop", "all_stop")


async def one(c: httpx.AsyncClient, prompt: str, tokens: int, watch: str | None) -> tuple[int, float]:
    body = {"model": "functok-tiny", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    if watch:
        body["stop_when"] = NEVER | {"action": watch}
    t0 = time.perf_counter()
    r = await c.post("/v1/completions", json=body)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    if choice["finish_reason"] != "length" or (watch and choice["monitor"]["triggered"]):
        raise RuntimeError(f"a request did not run to max_tokens: {choice['finish_reason']}")
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - t0


async def round_(url: str, mode: str, ps: list[str], tokens: int) -> dict:
    watch = [None] * len(ps)
    if mode != "plain":
        watch = ["stop"] * len(ps) if mode == "all_stop" else [mode.split("_")[1]] + watch[1:]
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(c, p, tokens, w) for p, w in zip(ps, watch, strict=True)))
        wall = time.perf_counter() - t0
    return {"tokens_per_s": sum(n for n, _ in got) / wall, "first_s": got[0][1]}


def plot(table: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(table), [table[m]["tokens_per_s"] for m in table], color=["#888", "#69c", "#c66", "#a33"])
    for i, m in enumerate(table):
        ax.text(i, table[m]["tokens_per_s"], f"{table[m]['ratio']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("tokens/s (median round)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="vLLM's compiled graph (default: eager, a faster start)")
    a = ap.parse_args()
    env = os.environ | {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["FUNCTOK_VLLM_ARGS"] = json.dumps({"enforce_eager": not a.compiled, "max_num_seqs": a.requests})
    log = Path(tempfile.mkdtemp()) / "server.log"
    args = ["--model", str(DEMO_MODEL), "--engine", "vllm", "--max-model-len", "256"]
    srv = start(functok_serve(*args), log, env, timeout_s=600)
    ps = prompts(a.requests)
    load = {"before": loadavg()}
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        for m in MODES:  # warm-up
            asyncio.run(round_(srv.url, m, ps, a.tokens))
        for _ in tqdm(range(a.repeats), desc="rounds"):
            for m in MODES:
                runs[m].append(asyncio.run(round_(srv.url, m, ps, a.tokens)))
    finally:
        srv.stop()
    load["after"] = loadavg()
    base = statistics.median(r["tokens_per_s"] for r in runs["plain"])
    base_first = statistics.median(r["first_s"] for r in runs["plain"])
    table = {}
    for m in MODES:
        tps = statistics.median(r["tokens_per_s"] for r in runs[m])
        first = statistics.median(r["first_s"] for r in runs[m])
        paired = [r["tokens_per_s"] / p["tokens_per_s"] for r, p in zip(runs[m], runs["plain"], strict=True)]
        table[m] = {"tokens_per_s": tps, "ratio": tps / base, "first_s": first, "first_ratio": first / base_first}
        table[m]["paired_quartiles"] = statistics.quantiles(paired, n=4)  # its round / the plain round beside it
    print(f"{'mode':10s} {'tok/s':>8s} {'ratio':>6s} {'paired ratio quartiles':>24s} {'req0 s':>7s} {'ratio':>6s}")
    for m, t in table.items():
        q = " ".join(f"{x:.2f}" for x in t["paired_quartiles"])
        print(
            f"{m:10s} {t['tokens_per_s']:8.1f} {t['ratio']:6.2f} {q:>24s} {t['first_s']:7.2f} {t['first_ratio']:6.2f}"
        )
    print(f"load average before {load['before']}, after {load['after']}")
    setup = {k: getattr(a, k) for k in ("tokens", "requests", "repeats", "compiled")}
    path = write_result("bench_stop_when", {"setup": setup, "load": load, "table": table, "runs": runs})
    title = f"vLLM engine, {a.requests} requests x {a.tokens} tokens, load {load['before'][0]:.1f}"
    png = plot(table, RESULTS / "stop_when_cost.png", title)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
