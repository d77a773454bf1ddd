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
