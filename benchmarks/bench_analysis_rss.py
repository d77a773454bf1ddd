"""Cost of the coverage analysis against a bare forward, and the server's resident memory with 1 and 3 SAEs.

(a) Coverage: the analysis module's edge accumulation (analysis.coverage.build_graphs: one forward per batch with
    capture hooks encoding every position through the SAEs at layers 0, 1 and 2) against a bare forward
    (HFAnalysisModel.forward, no hooks, logits=False) over the same held-out token stream (`--tokens`, default 16,384),
    same sequence length and batch size. After a warm-up the two run in turn `--repeats` times (interleaved); medians
    and their ratio. summarize() (degrees and the coverage curve, done once after accumulation) is timed once apart.
(b) Memory: `functok serve` started as a subprocess on a free loopback port with 1 SAE (layer_1) and with the
    default 3 SAEs; VmRSS (and VmHWM, the peak) from /proc/PID/status once /health answers and again after
    `--requests` steered completions (concurrent, `--max-tokens` tokens, one add edit at layer 1 on all positions).
    Each server is stopped by its pid (SIGTERM, then SIGKILL if it does not exit).

Writes benchmarks/results/bench_analysis_rss.json.

    .venv/bin/python benchmarks/bench_analysis_rss.py [--tokens 16384] [--threads 2] [--repeats 3] [--no-rss]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prompts, write_result  # noqa: E402

from analysis.coverage import CoverageConfig, build_graphs, summarize  # noqa: E402
from analysis.data import sequences, token_stream  # noqa: E402
from analysis.model import load_hf  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES  # noqa: E402


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def coverage_vs_forward(n_tokens: int, repeats: int) -> dict:
    am = load_hf(DEMO_MODEL, DEMO_SAES, DEMO_FUNCTION_TOKENS)
    stream = token_stream(am.encode, am.eos_id, None, n_tokens)  # held-out split of the shared corpus
    cfg = CoverageConfig(max_tokens=n_tokens)

    def coverage():
        return build_graphs(am, stream, cfg, progress=False)

    def bare():
        for batch in sequences(stream, cfg.seq_len, cfg.batch_size):
            am.forward(batch, None, logits=False)

    modes = {"coverage_3_layers": coverage, "bare_forward": bare}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for fn in modes.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved
        for name, fn in modes.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    graphs = coverage()
    t = time.perf_counter()
    summary = summarize(graphs, am.fn_mask, am.decode)
    t_summary = time.perf_counter() - t
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "tokens": len(stream),
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "layers": sorted(am.saes),
        "seconds": med,
        "all_seconds": times,
        "tokens_per_s": {name: len(stream) / s for name, s in med.items()},
        "ratio_coverage_over_bare": med["coverage_3_layers"] / med["bare_forward"],
        "summarize_seconds_once": t_summary,
        "feature_nodes": {layer: s["feature_nodes"] for layer, s in summary["layers"].items()},
    }


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_rss(sae_args: list[str], threads: int, n_requests: int, max_tokens: int) -> dict:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "functok_vllm.cli", "serve", "--port", str(port), "--threads", str(threads)]
    proc = subprocess.Popen(cmd + sae_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > 180 or proc.poll() is not None:
                raise RuntimeError(f"the server ({' '.join(sae_args) or 'default SAEs'}) did not start")
            time.sleep(0.25)
        ready_s = time.monotonic() - t0
        time.sleep(1.0)  # let the startup settle
        at_ready = proc_status(proc.pid)

        def one(i: int, prompt: str) -> int:
            steering = {"edits": [{"layer": 1, "feature": 100 + 37 * i, "strength": 8.0}], "positions": "all"}
            body = {
                "model": "functok-tiny",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "steering": steering,
            }
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        with ThreadPoolExecutor(n_requests) as pool:
            got = list(pool.map(one, range(n_requests), prompts(n_requests)))
        time.sleep(0.5)
        after = proc_status(proc.pid)
    finally:
        proc.terminate()  # this pid only
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return {
        "sae_args": sae_args,
        "ready_seconds": ready_s,
        "rss_kib_at_ready": at_ready["VmRSS"],
        "rss_kib_after_requests": after["VmRSS"],
        "hwm_kib_after_requests": after["VmHWM"],
        "completion_tokens": sum(got),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-rss", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = {"start": loadavg()}
    cov = coverage_vs_forward(args.tokens, args.repeats)
    load["after_coverage"] = loadavg()
    print(
        f"\n(a) {cov['tokens']} held-out tokens, seq {cov['seq_len']} x batch {cov['batch_size']}, layers "
        f"{cov['layers']}, {args.threads} threads, median of {args.repeats}"
    )
    print(f"{'mode':<22}{'seconds':>10}{'tokens/s':>12}")
    for name, s in cov["seconds"].items():
        print(f"{name:<22}{s:>10.3f}{cov['tokens_per_s'][name]:>12.0f}")
    print(
        f"coverage / bare forward: {cov['ratio_coverage_over_bare']:.2f}x; "
        f"summarize() once: {cov['summarize_seconds_once']:.3f} s"
    )
    rss = {}
    if not args.no_rss:
        for name, sae_args in (("1_sae_layer_1", ["--sae", str(DEMO_SAES / "layer_1")]), ("3_saes_default", [])):
            rss[name] = server_rss(sae_args, args.threads, args.requests, args.max_tokens)
        load["end"] = loadavg()
        print(f"\n(b) functok serve VmRSS (MiB), {args.requests} steered requests x {args.max_tokens} tokens")
        print(f"{'server':<18}{'at /health':>12}{'after reqs':>12}{'peak (HWM)':>12}")
        for name, r in rss.items():
            print(
                f"{name:<18}{r['rss_kib_at_ready'] / 1024:>12.1f}{r['rss_kib_after_requests'] / 1024:>12.1f}"
                f"{r['hwm_kib_after_requests'] / 1024:>12.1f}"
            )
        one, three = rss["1_sae_layer_1"], rss["3_saes_default"]
        diff = (three["rss_kib_after_requests"] - one["rss_kib_after_requests"]) / 1024
        print(f"3 SAEs - 1 SAE after requests: {diff:.1f} MiB")
    print(f"load average (1/5/15 min): {load}")
    payload = {"args": vars(args), "loadavg": load, "coverage_vs_forward": cov, "server_rss": rss}
    out = write_result("bench_analysis_rss", payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
