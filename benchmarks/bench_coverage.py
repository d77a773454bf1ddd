"""Coverage throughput against a bare forward over the same tokens, on the transformers engine and on vLLM, and peak
memory.

For each engine, over the same held-out token stream (`--tokens`, default 16,384) cut into 256-token windows:
- coverage: the analysis's capture (`am.capture_edges`: encode at SAE layers 0, 1, 2 and update the token-feature
  bitsets on the device) — transformers: one hooked forward per batch of 8 windows; vLLM: capture mode of the
  worker extension, every window a prompt with max_tokens=1;
- bare: the same forwards without capture — transformers: `HFAnalysisModel.forward(batch, logits=False)`; vLLM: the
  same `generate` calls with no capture session (so scheduling and the one sampled token are in both).
After one warm-up of each, the two modes run in turn `--repeats` times (interleaved); medians and their ratio.
Memory: VmHWM (peak resident) of the process doing the forwards (this one for transformers, vLLM's worker for vLLM)
after the bare warm-up and again after the coverage warm-up; and the graphs' own size (bits + counts).

Writes benchmarks/results/bench_coverage.json.

    .venv/bin/python benchmarks/bench_coverage.py [--tokens 16384] [--threads 2] [--repeats 3] [--no-vllm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from functok_vllm.analysis.coverage import CoverageConfig, build_graphs  # noqa: E402
from functok_vllm.analysis.data import sequences, token_stream  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES  # noqa: E402


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def graph_mib(graphs) -> float:
    return sum(sum(t.numel() * t.element_size() for t in g.state().values()) for g in graphs.values()) / 2**20


def timed(modes: dict, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):  # interleaved
        for name, fn in modes.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def measure(am, stream: torch.Tensor, bare, repeats: int, pid_of) -> dict:
    cfg = CoverageConfig(max_tokens=len(stream))
    graphs = {}

    def coverage():
        graphs.update(build_graphs(am, stream, cfg, progress=False))

    bare()  # warm-up, then the peak without capture
    hwm_bare = hwm_mib(pid_of())
    coverage()
    hwm_cov = hwm_mib(pid_of())
    times = timed({"coverage_3_layers": coverage, "bare": bare}, repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "tokens": len(stream),
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "seconds": med,
        "all_seconds": times,
        "tokens_per_s": {name: len(stream) / s for name, s in med.items()},
        "throughput_coverage_over_bare": med["bare"] / med["coverage_3_layers"],
        "peak_rss_mib": {"after_bare": hwm_bare, "after_coverage": hwm_cov},
        "graph_mib": graph_mib(graphs),
        "edges": {layer: g.n_edges for layer, g in graphs.items()},
    }


def bench_hf(n_tokens: int, repeats: int) -> dict:
    from functok_vllm.analysis.model import load_hf

    am = load_hf(DEMO_MODEL, DEMO_SAES, DEMO_FUNCTION_TOKENS)
    stream = token_stream(am.encode, am.eos_id, None, n_tokens)  # held-out split of the shared corpus
    cfg = CoverageConfig(max_tokens=n_tokens)

    def bare():
        for batch in sequences(stream, cfg.seq_len, cfg.batch_size):
            am.forward(batch, None, logits=False)

    return measure(am, stream, bare, repeats, os.getpid)


def bench_vllm(n_tokens: int, repeats: int) -> dict:
    import psutil

    from functok_vllm.analysis.vllm_model import load_vllm

    am = load_vllm(DEMO_MODEL, DEMO_SAES, DEMO_FUNCTION_TOKENS)  # sets the CPU defaults before vLLM is imported
    from vllm import SamplingParams

    stream = token_stream(am.encode, am.eos_id, None, n_tokens)
    cfg = CoverageConfig(max_tokens=n_tokens)
    windows = [{"prompt_token_ids": row.tolist()} for b in sequences(stream, cfg.seq_len, cfg.batch_size) for row in b]
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def bare():
        am.llm.generate(windows, params, use_tqdm=False)

    def worker_pid() -> int:  # the deepest descendant: API process -> engine core -> worker
        kids = psutil.Process().children(recursive=True)
        workers = [p for p in kids if not p.children()]
        return max(workers, key=lambda p: p.memory_info().rss).pid

    try:
        return measure(am, stream, bare, repeats, worker_pid)
    finally:
        am.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"transformers": bench_hf(args.tokens, args.repeats)}
    if not args.no_vllm:
        results["vllm"] = bench_vllm(args.tokens, args.repeats)
    print(f"\n{args.tokens} held-out tokens, 256-token windows, SAE layers 0-2, median of {args.repeats}")
    head = f"{'engine':<14}{'coverage tok/s':>16}{'bare tok/s':>12}{'ratio':>8}{'peak MiB bare/cov':>20}"
    print(head + f"{'graph MiB':>11}")
    for name, r in results.items():
        tps, peak = r["tokens_per_s"], r["peak_rss_mib"]
        print(
            f"{name:<14}{tps['coverage_3_layers']:>16.0f}{tps['bare']:>12.0f}{r['throughput_coverage_over_bare']:>8.2f}"
            f"{peak['after_bare']:>10.0f} / {peak['after_coverage']:<7.0f}{r['graph_mib']:>11.2f}"
        )
    out = write_result("bench_coverage", {"args": vars(args), "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
