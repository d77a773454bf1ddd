"""The load test harness: a short locust run against the demo server, loopback-only refusal, and the summary files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL_WEIGHTS_1 = "--unsteered-weight 1 --steered-weight 1 --stream-weight 1 --reactivation-weight 1"


def loadtest(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "loadtest.run", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def stats_rows(out: Path) -> dict[tuple[str, str], dict]:
    with open(out / "locust_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_short_run_every_user_class_sends_requests_without_failures(tmp_path):
    out = tmp_path / "run"
    p = loadtest(
        "--users", "4", "--spawn-rate", "4", "--run-time", "10s", "--out", str(out), "--locust-args", ALL_WEIGHTS_1
    )
    assert p.returncode == 0, p.stdout + p.stderr + (out / "locust.log").read_text()
    rows = stats_rows(out)
    classes = json.loads((out / "locust_classes.json").read_text())
    ran = {c["request_name"] for c in classes["ran"].values()}
    assert {"chat unsteered", "chat steered", "chat stream"} <= ran
    assert ("reactivation" in ran) == classes["reactivation_endpoint_listed"]
    for name in ran:
        row = rows[("POST", name)]
        assert int(row["Request Count"]) > 0, name
        assert int(row["Failure Count"]) == 0, name
    ttft = rows[("TTFT", "chat stream")]
    assert int(ttft["Request Count"]) > 0 and int(ttft["Failure Count"]) == 0
    assert float(ttft["Median Response Time"]) <= float(rows[("POST", "chat stream")]["Max Response Time"])
    assert rows[("", "Aggregated")]["Failure Count"] == "0"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0
    assert summary["requests"] == sum(int(rows[("POST", n)]["Request Count"]) for n in ran)
    assert {"chat unsteered", "chat steered"} <= set(summary["side_by_side"])
    assert "chat steered" in (out / "summary.md").read_text()
    assert (out / "report.html").stat().st_size > 0
    assert "Started server process" in (out / "server.log").read_text()


def test_refuses_a_non_loopback_host(tmp_path):
    for host in ("http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1:21"):
        p = loadtest("--host", host, "--run-time", "5s", "--out", str(tmp_path / "x"), timeout=30)
        assert p.returncode == 2, host
        assert "--host" in p.stderr and "127.0.0.1" in p.stderr, p.stderr
    assert not (tmp_path / "x" / "locust.log").exists()


def test_soak_judges_memory_on_the_floor_between_transient_peaks():
    from loadtest.soak import rss_report

    warm = [(t, 460.0) for t in range(0, 20, 5)]  # before the first requests
    spikes = {300: 640.0, 305: 610.0, 560: 620.0}  # a reactivation batch's working set, given back seconds later
    flat = warm + [(t, spikes.get(t, 592.5)) for t in range(20, 600, 5)]
    r = rss_report(460.0, flat, 592.5)
    assert r["steady_start_mib"] == r["steady_end_mib"] == 592.5 and r["steady_growth_mib"] == 0.0
    assert r["max_mib"] == 640.0 and r["first_under_load_mib"] == 460.0  # raw samples: peaks and warm-up included
    leak = warm + [(t, 592.5 + t / 60) for t in range(20, 600, 5)]  # 1 MiB a minute, steadily
    r = rss_report(460.0, leak, 602.5)
    assert r["steady_growth_mib"] == 7.0 and abs(r["floor_slope_mib_per_min"] - 1.0) < 0.05
