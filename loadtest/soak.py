"""`python -m loadtest.soak`: minutes of mixed load on a loopback server; checks failures, memory, and greedy replays.

    python -m loadtest.soak --run-time 10m --users 8 --out loadtest/results/soak

It starts `functok serve` on a free loopback port, samples the server's resident memory (VmRSS in /proc/PID/status)
every --rss-interval seconds, and runs locust with unsteered, steered, streamed and recorded users (and reactivation
scoring when the server has it). RecordedUser sends a fixed set of greedy requests and logs each (request, output)
pair; afterwards every recorded request is sent again alone and must return the same token ids it returned under load.
Memory is judged on the steady state: the lowest RSS of each minute (between transient request peaks), from the
second minute (after warm-up) to the last. Exit status 0 only when there were requests, no failures, no replay
differed, and that floor grew by at most --max-growth-mib. Not part of the default test run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
import urllib.request
from pathlib import Path

from loadtest.run import CSV_PREFIX, LoadTestError, run_locust, seconds, server
from loadtest.summary import cell, write_summary

WEIGHTS = "--unsteered-weight 2 --steered-weight 2 --stream-weight 1 --reactivation-weight 1 --recorded-weight 2"


def rss_mib(pid: int) -> float | None:
    """The process's resident set size in MiB (VmRSS), or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class RSSSampler(threading.Thread):
    """Samples a process's VmRSS every `interval` seconds into `samples` [(seconds since start, MiB)] until stopped."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples = pid, interval, []
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self.stopped.is_set():
            if (mib := rss_mib(self.pid)) is not None:
                self.samples.append((round(time.monotonic() - self.t0, 1), mib))
            self.stopped.wait(self.interval)

    def stop(self):
        self.stopped.set()
        self.join()


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of RSS over time, in MiB per minute; None with fewer than 3 samples."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return None if var == 0 else 60 * sum((t - mt) * (r - mr) for t, r in samples) / var


def floors(samples: list[tuple[float, float]], window_s: float = 60.0) -> list[tuple[float, float]]:
    """(window start, lowest RSS in the window) for each full window of the run: the memory the server holds between
    requests. A leak raises it; a request's transient working set (a reactivation batch peaks ~50 MiB for a few
    seconds, then is given back) does not, though it would tilt a slope fitted to the raw samples."""
    if not samples:
        return []
    out = []
    for k in range(int(samples[-1][0] // window_s)):
        inside = [r for t, r in samples if k * window_s <= t < (k + 1) * window_s]
        if inside:
            out.append((k * window_s, min(inside)))
    return out


def post(url: str, body: dict, api_key: str) -> dict:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def replay(url: str, record_file: Path, sample: int, api_key: str) -> dict:
    """Send each recorded case (up to `sample` of them) alone; compare its token ids with every output under load."""
    by_case: dict[int, list[dict]] = {}
    if record_file.is_file():
        for line in record_file.read_text().splitlines():
            rec = json.loads(line)
            by_case.setdefault(rec["case"], []).append(rec)
    cases = sorted(by_case)[:sample]
    differing, under_load_disagree = [], []
    for case in cases:
        recs = by_case[case]
        alone = post(f"{url}/v1/chat/completions", recs[0]["request"], api_key)["choices"][0]["token_ids"]
        bad = [r for r in recs if r["token_ids"] != alone]
        if bad:
            differing.append({"case": case, "alone": alone, "under_load": [r["token_ids"] for r in bad][:3]})
        if len({tuple(r["token_ids"]) for r in recs}) > 1:
            under_load_disagree.append(case)
    return {
        "recorded_responses": sum(len(v) for v in by_case.values()),
        "cases_recorded": len(by_case),
        "cases_replayed": len(cases),
        "responses_compared": sum(len(by_case[c]) for c in cases),
        "cases_differing": len(differing),
        "cases_disagreeing_under_load": len(under_load_disagree),
        "differences": differing[:5],
    }


def rss_report(before: float | None, samples: list, after: float | None) -> dict:
    """Raw samples (first, last, max, slopes) and the steady state: per-minute floors from the second minute on (the
    first holds the one-time warm-up: the first requests of each kind allocate what they keep reusing)."""
    under = [r for _, r in samples]
    steady = floors(samples)[1:]
    return {
        "before_load_mib": before,
        "first_under_load_mib": under[0] if under else None,
        "last_under_load_mib": under[-1] if under else None,
        "max_mib": max(under) if under else None,
        "after_replay_mib": after,
        "samples": len(under),
        "slope_mib_per_min": None if (s := slope_mib_per_min(samples)) is None else round(s, 3),
        "slope_second_half_mib_per_min": (
            None if (s := slope_mib_per_min(samples[len(samples) // 2 :])) is None else round(s, 3)
        ),
        "minute_floors_mib": [r for _, r in floors(samples)],
        "steady_start_mib": steady[0][1] if steady else None,
        "steady_end_mib": steady[-1][1] if steady else None,
        "steady_growth_mib": round(steady[-1][1] - steady[0][1], 1) if len(steady) >= 2 else None,
        "floor_slope_mib_per_min": None if (s := slope_mib_per_min(steady)) is None else round(s, 3),
    }


def markdown(result: dict) -> str:
    s, rss, rep = result["summary"], result["rss"], result["replay"]
    lines = [
        f"# Soak: {result['users']} users for {result['run_time']} ({'PASS' if result['passed'] else 'FAIL'})",
        "",
        f"- requests: {s['requests']}, failures: {s['failures']}, {s['rps']:.2f} requests/s",
        f"- server RSS (MiB): before load {rss['before_load_mib']}, first sample under load "
        f"{rss['first_under_load_mib']}, last under load {rss['last_under_load_mib']}, max {rss['max_mib']}, "
        f"after replay {rss['after_replay_mib']} ({rss['samples']} samples; slope {rss['slope_mib_per_min']} MiB/min, "
        f"second half {rss['slope_second_half_mib_per_min']} MiB/min)",
        (
            f"- steady state (lowest RSS of each minute, from the second): {rss['steady_start_mib']} -> "
            f"{rss['steady_end_mib']} MiB, growth {rss['steady_growth_mib']} MiB (limit {result['max_growth_mib']}), "
            f"slope {rss['floor_slope_mib_per_min']} MiB/min; minute floors {rss['minute_floors_mib']}"
            if result["memory_judged"]
            else "- memory NOT judged: a steady state needs a run of at least 3 minutes (warm-up minute + 2)"
        ),
        f"- replay alone: {rep['cases_replayed']} cases, {rep['responses_compared']} responses under load compared, "
        f"{rep['cases_differing']} cases differing; {rep['cases_disagreeing_under_load']} cases whose outputs under "
        "load disagreed among themselves",
        "",
        "| request | requests | failures | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    rows = list(s["side_by_side"].items()) + [(f"TTFT {name}", v) for name, v in s["ttft"].items()]
    for name, v in rows:
        cells = [
            f"{v['requests']:.0f}",
            f"{v['failures']:.0f}",
            *(cell(v[k]) for k in ("p50_ms", "p95_ms", "p99_ms")),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    p.add_argument("--run-time", default="10m")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=4)
    p.add_argument("--out", type=Path, default=Path("loadtest/results/soak"))
    p.add_argument("--rss-interval", type=float, default=5.0, help="seconds between VmRSS samples")
    p.add_argument("--sample", type=int, default=16, help="recorded cases to replay alone")
    p.add_argument(
        "--max-growth-mib",
        type=float,
        default=16.0,
        help="most the steady-state RSS (per-minute floor, second minute to last) may grow for a pass",
    )
    p.add_argument("--serve-args", default="", help="extra `functok serve` options")
    p.add_argument("--locust-args", default=WEIGHTS, help=f"locust options (default: {WEIGHTS!r})")
    p.add_argument("--api-key", default=os.environ.get("FUNCTOK_API_KEY", ""))
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    record = (out / "recorded.jsonl").resolve()
    record.unlink(missing_ok=True)
    try:
        seconds(args.run_time)
        with server(None, out / "server.log", shlex.split(args.serve_args), args.api_key) as (url, pid):
            before = rss_mib(pid)
            sampler = RSSSampler(pid, args.rss_interval)
            sampler.start()
            extra = shlex.split(args.locust_args) + ["--record-file", str(record)]
            print(f"soak: {args.users} users against {url} for {args.run_time} ...", file=sys.stderr, flush=True)
            try:
                rc = run_locust(url, out, args.users, args.spawn_rate, args.run_time, 10, extra, args.api_key)
            finally:
                sampler.stop()
            replayed = replay(url, record, args.sample, args.api_key)
            after = rss_mib(pid)
    except LoadTestError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    run = {"users": args.users, "spawn_rate": args.spawn_rate, "run_time": args.run_time, "host": url}
    run["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = write_summary(out, CSV_PREFIX, run | {"server": "started here", "locust_exit_code": rc})
    passed = rc == 0 and summary["requests"] > 0 and summary["failures"] == 0 and replayed["cases_differing"] == 0
    passed = passed and replayed["cases_replayed"] > 0
    rss = rss_report(before, sampler.samples, after)
    growth = rss["steady_growth_mib"]
    passed = passed and (growth is None or growth <= args.max_growth_mib)  # runs under 3 minutes: no steady state
    result = run | {
        "passed": passed,
        "memory_judged": growth is not None,
        "max_growth_mib": args.max_growth_mib,
        "summary": summary,
        "rss": rss,
        "rss_samples": sampler.samples,
        "replay": replayed,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "soak.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
