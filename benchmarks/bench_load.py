"""Latency (p50/p95/p99) and throughput against offered load (closed-loop users), steered and unsteered, on loopback.

    python -m benchmarks.bench_load                      # users 1 2 4 8 16, 15 s per point, both mixes
    python -m benchmarks.bench_load --users 1 4 --run-time 10s

Starts one `functok serve` (the demo model unless --serve-args says otherwise) on a free loopback port and, for each
user count and mix (the mixes interleaved), runs loadtest/locustfile.py headless with no think time: each user sends
its next chat request as soon as the last one returns, so the user count is the number of requests in flight. The
"unsteered" mix sends only UnsteeredChatUser requests, the "steered" mix only SteeredChatUser ones (1-3 random
add/clamp edits per request, random layers, features and position policies). Writes benchmarks/results/load.json and
latency_vs_load.png. Locust runs on the same machine as the server, and the 1-minute load average after each point is
recorded, since on a shared machine other jobs move these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loadtest.run import CSV_PREFIX, run_locust, server
from loadtest.summary import read_stats

MIXES = {
    "unsteered": (
        "chat unsteered",
        "--unsteered-weight 1 --steered-weight 0 --stream-weight 0 --reactivation-weight 0",
    ),
    "steered": ("chat steered", "--unsteered-weight 0 --steered-weight 1 --stream-weight 0 --reactivation-weight 0"),
}
RESULTS = Path(__file__).with_name("results")


def warm_up(url: str, n: int = 3) -> None:
    """A few requests before measuring, so the first point does not pay for lazy initialisation."""
    models = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=30).read())
    body = {"model": models["data"][0]["id"], "messages": [{"role": "user", "content": "Call me Ishmael."}]}
    body |= {"max_tokens": 16, "temperature": 0}
    for _ in range(n):
        req = urllib.request.Request(
            f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(req, timeout=120).read()


def scrape(url: str) -> dict[str, float]:
    """The server's Prometheus counters: {"name{labels}": value}."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))}


def server_side(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the server counted during one point: tokens per request, finish reasons, mean decode batch."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after if k.split("{")[0].endswith("_total")}
    finished = {k: v for k, v in delta.items() if k.startswith("functok:request_finished_total") and v}
    n = sum(finished.values())
    stops = sum(v for k, v in finished.items() if 'finish_reason="stop"' in k)
    steps = delta.get("functok:engine_decode_steps_total", 0.0)
    return {
        "server_finished": int(n),
        "server_finished_stop": int(stops),
        "completion_tokens_per_request": round(delta.get("functok:generation_tokens_total", 0.0) / n, 2) if n else None,
        "mean_decode_batch": round(delta.get("functok:engine_decode_rows_total", 0.0) / steps, 2) if steps else None,
    }


def measure(url: str, mix: str, users: int, run_time: str, max_tokens: int, work: Path) -> dict:
    name, weights = MIXES[mix]
    counters = scrape(url)
    out = work / f"{mix}-{users}"
    extra = shlex.split(weights) + ["--think-time", "0", "--max-tokens", str(max_tokens)]
    t0 = time.monotonic()
    rc = run_locust(url, out, users, users, run_time, stop_timeout=15, extra=extra)
    row = read_stats(out / f"{CSV_PREFIX}_stats.csv").get(f"POST {name}", {})
    point = {"mix": mix, "users": users, "locust_exit_code": rc, "wall_s": round(time.monotonic() - t0, 1)}
    point |= server_side(counters, scrape(url))
    point["loadavg_1min_after"] = round(os.getloadavg()[0], 2)  # the machine may be shared: background load
    for k in ("requests", "failures", "rps", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms"):
        v = row.get(k)
        point[k] = None if v is None else int(v) if k in ("requests", "failures") else round(v, 2)
    if point["rps"] and point["completion_tokens_per_request"]:
        point["completion_tokens_per_s"] = round(point["rps"] * point["completion_tokens_per_request"], 1)
    print(json.dumps(point), file=sys.stderr, flush=True)
    return point


def title(config: dict) -> str:
    return (
        f"functok serve, {config['max_tokens']} new tokens max per request (generated tokens/s = requests/s x the "
        f"server's tokens per request), {config['cpu_count']} CPU cores shared with locust and other jobs"
    )


def plot(points: list[dict], path: Path, heading: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_rps, ax_tok) = plt.subplots(1, 3, figsize=(15, 4.2))
    for mix, color in zip(MIXES, ("tab:blue", "tab:red"), strict=True):
        pts = sorted((p for p in points if p["mix"] == mix and p["requests"]), key=lambda p: p["users"])
        users = [p["users"] for p in pts]
        ax_lat.plot(users, [p["p50_ms"] for p in pts], "o-", color=color, label=f"{mix} p50")
        ax_lat.plot(users, [p["p95_ms"] for p in pts], "s--", color=color, label=f"{mix} p95")
        ax_rps.plot(users, [p["rps"] for p in pts], "o-", color=color, label=mix)
        ax_tok.plot(users, [p.get("completion_tokens_per_s") for p in pts], "o-", color=color, label=mix)
    ticks = sorted({p["users"] for p in points})
    for ax in (ax_lat, ax_rps, ax_tok):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent users (closed loop, no think time)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_lat.set_ylabel("latency per request (ms)")
    ax_rps.set_ylabel("throughput (requests/s)")
    ax_tok.set_ylabel("generated tokens/s")
    for ax in (ax_lat, ax_rps, ax_tok):
        ax.set_ylim(bottom=0)
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_load", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--run-time", default="15s", help="per point")
    p.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--serve-args", default="", help="extra `functok serve` options")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing OUT/load.json")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        saved = json.loads((args.out / "load.json").read_text())
        plot(saved["points"], args.out / "latency_vs_load.png", title(saved["config"]))
        return 0
    points, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        work = Path(tmp)
        with server(None, work / "server.log", shlex.split(args.serve_args)) as (url, _pid):
            warm_up(url)
            for users in args.users:  # mixes interleaved, so that drifting background load hits both alike
                for mix in args.mixes:
                    points.append(measure(url, mix, users, args.run_time, args.max_tokens, work))
    config = {
        "run_time_per_point": args.run_time,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "serve_args": args.serve_args or "(defaults: demo model functok-tiny, SAEs at layers 0-2, hf engine)",
        "load": "closed loop: N locust users, no think time; locust runs on the same machine as the server",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (args.out / "load.json").write_text(json.dumps({"config": config, "points": points}, indent=2) + "\n")
    plot(points, args.out / "latency_vs_load.png", title(config))
    print(f"wrote {args.out / 'load.json'} and {args.out / 'latency_vs_load.png'}", file=sys.stderr)
    failed = [p for p in points if p["locust_exit_code"] != 0 or not p["requests"] or p["failures"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
