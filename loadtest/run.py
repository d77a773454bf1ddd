"""`python -m loadtest.run`: start a loopback functok server (or use one), run locust headless on it, write a summary.

    python -m loadtest.run --users 8 --spawn-rate 4 --run-time 30s --out loadtest/results/demo
    python -m loadtest.run --host http://127.0.0.1:8000 --users 4 --run-time 20s --out loadtest/results/mine

Traffic goes to loopback only: --host must name 127.0.0.0/8, ::1 or localhost. Users and run time are bounded, locust
runs with --stop-timeout, and the started server's process group is terminated when the run ends, however it ends.
Exit status: 0 when every request succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from functok_vllm.launch import Server, ServerStartError, start, wait_healthy
from loadtest.summary import markdown, write_summary

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"
MAX_USERS = 64
MAX_RUN_S = 3600


class LoadTestError(Exception):
    """A bad option or a server that never came up; the message says which."""


def loopback_url(url: str) -> str:
    """`url` without a trailing slash, if it is http(s) on a loopback address; LoadTestError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadTestError(f"--host {url!r}: expected http://127.0.0.1:PORT")
    name = parts.hostname
    try:
        loop = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        loop = False
    if not loop:
        raise LoadTestError(f"--host {url!r}: refusing to send load to a non-loopback host ({name}); use 127.0.0.1")
    return url.rstrip("/")


def seconds(timespan: str) -> int:
    """Locust's run time ("30s", "2m", "1h30m", "45") in seconds."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", timespan.strip())
    if not timespan.strip() or m is None:
        raise LoadTestError(f"--run-time {timespan!r}: expected e.g. 30s, 2m or 1h30m")
    h, mi, s = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


def stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL it if it has not exited after `grace_s`."""
    Server(proc, "", None).stop(grace_s)


def functok_command() -> list[str]:
    exe = Path(sys.executable).with_name("functok")
    return [str(exe)] if exe.exists() else [shutil.which("functok") or "functok"]


@contextmanager
def server(host: str | None, log_path: Path, serve_args: list[str] = (), api_key: str = "", health_timeout_s=300):
    """Yield (url, server pid or None): the given loopback server, or a `functok serve` run here and stopped after."""
    try:
        if host:
            url = loopback_url(host)
            wait_healthy(url, min(health_timeout_s, 30))
            yield url, None
            return
        cmd = functok_command() + ["serve", "--host", "127.0.0.1", *serve_args]
        env = os.environ | ({"FUNCTOK_API_KEY": api_key} if api_key else {})
        srv = start(cmd, log_path, env, health_timeout_s)
    except ServerStartError as e:
        raise LoadTestError(str(e).splitlines()[0]) from None
    try:
        yield srv.url, srv.proc.pid
    finally:
        srv.stop(grace_s=20)


def run_locust(
    url: str,
    out: Path,
    users: int,
    spawn_rate: float,
    run_time: str,
    stop_timeout: int = 10,
    extra: list[str] = (),
    api_key: str = "",
) -> int:
    """Run locust headless against `url`, writing `out/locust_*.csv`, `out/report.html` and `out/locust.log`."""
    if not 1 <= users <= MAX_USERS:
        raise LoadTestError(f"--users {users}: must be in [1, {MAX_USERS}]")
    if not 0 < seconds(run_time) <= MAX_RUN_S:
        raise LoadTestError(f"--run-time {run_time}: must be between 1 s and {MAX_RUN_S} s")
    url = loopback_url(url)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url]
    cmd += ["-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--stop-timeout", str(stop_timeout)]
    cmd += ["--csv", str(out / CSV_PREFIX), "--html", str(out / "report.html"), "--only-summary", *extra]
    env = os.environ | ({"FUNCTOK_API_KEY": api_key} if api_key else {})
    with open(out / "locust.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return proc.wait(seconds(run_time) + stop_timeout + 120)
    except subprocess.TimeoutExpired:
        return -1
    finally:
        stop_group(proc, grace_s=10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=8, help=f"concurrent users, at most {MAX_USERS}")
    p.add_argument("--spawn-rate", type=float, default=4, help="users started per second")
    p.add_argument("--run-time", default="30s", help="e.g. 30s, 2m (at most 1h)")
    p.add_argument("--out", type=Path, required=True, help="directory for the CSVs, report.html and summary.*")
    p.add_argument("--host", default=None, help="an existing server (loopback only); default: start one")
    p.add_argument("--serve-args", default="", help='extra `functok serve` options, e.g. "--config c.json"')
    p.add_argument("--api-key", default=os.environ.get("FUNCTOK_API_KEY", ""), help="bearer key (or FUNCTOK_API_KEY)")
    p.add_argument("--stop-timeout", type=int, default=10, help="seconds locust waits for running requests at the end")
    p.add_argument("--locust-args", default="", help='extra locust options, e.g. "--steered-weight 3 --max-tokens 8"')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.host:
            loopback_url(args.host)
        seconds(args.run_time)
        args.out.mkdir(parents=True, exist_ok=True)
        serve_args = shlex.split(args.serve_args)
        with server(args.host, args.out / "server.log", serve_args, args.api_key) as (url, pid):
            print(f"loadtest: {args.users} users against {url} for {args.run_time} ...", file=sys.stderr, flush=True)
            rc = run_locust(
                url,
                args.out,
                args.users,
                args.spawn_rate,
                args.run_time,
                args.stop_timeout,
                shlex.split(args.locust_args),
                args.api_key,
            )
    except LoadTestError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    run = {
        "users": args.users,
        "spawn_rate": args.spawn_rate,
        "run_time": args.run_time,
        "host": url,
        "server": "started here" if pid else "existing",
        "locust_exit_code": rc,
        "locust_args": args.locust_args,
        "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    if not (args.out / f"{CSV_PREFIX}_stats.csv").is_file():
        print(f"loadtest: locust wrote no stats (exit code {rc}); see {args.out / 'locust.log'}", file=sys.stderr)
        return 1
    summary = write_summary(args.out, CSV_PREFIX, run)
    print(markdown(summary))
    print(f"loadtest: wrote {args.out}/summary.md, summary.json, report.html, {CSV_PREFIX}_*.csv", file=sys.stderr)
    print(json.dumps({"requests": summary["requests"], "failures": summary["failures"]}), file=sys.stderr)
    return 0 if rc == 0 and summary["failures"] == 0 and summary["requests"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
