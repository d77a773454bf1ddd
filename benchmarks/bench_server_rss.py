"""The server's resident memory with 1 and 3 SAEs (coverage throughput and memory: `bench_coverage.py`).

`functok serve` started as a subprocess on a free loopback port with 1 SAE (layer_1) and with the default 3 SAEs;
VmRSS (and VmHWM, the peak) from /proc/PID/status once /health answers and again after `--requests` steered
completions (concurrent, `--max-tokens` tokens, one add edit at layer 1 on all positions). Each server is stopped by
its pid (SIGTERM, then SIGKILL if it does not exit).

Writes benchmarks/results/bench_server_rss.json.

    .venv/bin/python benchmarks/bench_server_rss.py [--threads 2] [--requests 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prompts, write_result  # noqa: E402

from functok_vllm.paths import DEMO_SAES  # noqa: E402


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0])
    return out


def server_rss(sae_args: list[str], threads: int, n_requests: int, max_tokens: int) -> dict:
    import httpx

    t0 = time.monotonic()
    from functok_vllm.launch import functok_serve, start

    server = start(functok_serve("--threads", str(threads), *sae_args))
    proc, base = server.proc, server.url
    try:
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
        server.stop(grace_s=30)
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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    load = {"start": loadavg()}
    rss = {}
    for name, sae_args in (("1_sae_layer_1", ["--sae", str(DEMO_SAES / "layer_1")]), ("3_saes_default", [])):
        rss[name] = server_rss(sae_args, args.threads, args.requests, args.max_tokens)
    load["end"] = loadavg()
    print(f"functok serve VmRSS (MiB), {args.requests} steered requests x {args.max_tokens} tokens")
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
    out = write_result("bench_server_rss", {"args": vars(args), "loadavg": load, "server_rss": rss})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
