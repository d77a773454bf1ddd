"""Read locust's `<prefix>_stats.csv`; write summary.json and summary.md: rates, latency percentiles, TTFT, failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = {  # our key -> locust's CSV column
    "requests": "Request Count",
    "failures": "Failure Count",
    "rps": "Requests/s",
    "mean_ms": "Average Response Time",
    "p50_ms": "50%",
    "p95_ms": "95%",
    "p99_ms": "99%",
    "max_ms": "Max Response Time",
}
SIDE_BY_SIDE = ("chat unsteered", "chat steered", "chat stream", "chat recorded", "reactivation")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # locust writes "N/A" for percentiles of a row without requests


def read_stats(csv_path: Path) -> dict[str, dict]:
    """{"POST chat steered": {...}, "TTFT chat stream": {...}, "Aggregated": {...}} from a locust stats CSV."""
    rows = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            key = f"{row['Type']} {row['Name']}".strip()
            rows[key] = {"type": row["Type"], "name": row["Name"]} | {k: _number(row[c]) for k, c in COLUMNS.items()}
    return rows


def summarize(rows: dict[str, dict], run: dict, classes: dict | None = None) -> dict:
    """The summary: the requests (TTFT rows apart, they are not requests), per-endpoint rows and side-by-side view."""
    requests = {k: v for k, v in rows.items() if k != "Aggregated" and v["type"] != "TTFT"}
    ttft = {v["name"]: v for v in rows.values() if v["type"] == "TTFT"}
    total_req = sum(v["requests"] or 0 for v in requests.values())
    total_fail = sum(v["failures"] or 0 for v in requests.values())
    by_name = {v["name"]: v for v in requests.values()}
    return {
        "run": run,
        "requests": int(total_req),
        "failures": int(total_fail),
        "rps": round(sum(v["rps"] or 0 for v in requests.values()), 3),
        "endpoints": requests,
        "ttft": ttft,
        "side_by_side": {name: by_name[name] for name in SIDE_BY_SIDE if name in by_name},
        "user_classes": classes or {},
    }


def cell(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def markdown(summary: dict) -> str:
    run = summary["run"]
    lines = [
        f"# Load test: {run.get('users')} users, spawn rate {run.get('spawn_rate')}/s, {run.get('run_time')}",
        "",
        f"Server: {run.get('host')} ({run.get('server')}); locust exit code {run.get('locust_exit_code')}.",
        f"Total: {summary['requests']} requests, {summary['failures']} failures, {summary['rps']:.2f} requests/s.",
    ]
    classes = summary["user_classes"]
    if classes:
        ran = ", ".join(f"{name} (weight {c['weight']})" for name, c in classes["ran"].items())
        left = "; ".join(f"{name}: {why}" for name, why in classes["left_out"].items()) or "none"
        lines += [f"User classes: {ran}. Left out: {left}."]
    lines += [
        "",
        "| request | requests | failures | req/s | p50 ms | p95 ms | p99 ms | mean ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = list(summary["side_by_side"].items())
    table += [(k, v) for k, v in summary["endpoints"].items() if v["name"] not in summary["side_by_side"]]
    table += [(f"time to first token ({name})", v) for name, v in summary["ttft"].items()]
    for label, v in table:
        cells = [cell(v[k]) for k in ("requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Latency of a streamed request is the whole stream; TTFT rows count streams, not requests."]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, csv_prefix: str, run: dict) -> dict:
    classes_file = out / f"{csv_prefix}_classes.json"
    classes = json.loads(classes_file.read_text()) if classes_file.is_file() else None
    summary = summarize(read_stats(out / f"{csv_prefix}_stats.csv"), run, classes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return summary
