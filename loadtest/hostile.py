"""`python -m loadtest.hostile`: a soak with hostile clients mixed into normal load on a loopback server; 0 5xx,
/health latency bounded, memory flat.

    python -m loadtest.hostile --run-time 150 --out loadtest/results/hostile

It starts `functok serve` (demo model, API and admin keys, a temporary data directory, short header and body
deadlines) and runs, for --run-time seconds, in threads: normal clients (completions, steered, streamed, chat) and
hostile ones: headers dripped a byte at a time, bodies announced and never sent, uploads over the size limit, GGUFs
declaring 2^63-element arrays, deeply nested JSON (bodies and `vllm_xargs.steering`), out-of-vocabulary echo ids, a
preset created and deleted under listings. It polls /health every 0.2 s and samples the server's VmRSS every 2 s.
Exit status 0 only when no answer was a 5xx, the slowest /health stayed under --max-health-s, normal requests
succeeded, and the lowest RSS of the last third grew by at most --max-growth-mib over that of the first third.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from loadtest.run import server
from loadtest.soak import RSSSampler

KEY, ADMIN = "sk-hostile-user", "sk-hostile-admin"
MODEL = "functok-tiny"
GOOD = {"model": MODEL, "prompt": "The king said", "max_tokens": 8, "temperature": 0}


class Tally:
    def __init__(self):
        self.lock, self.codes = threading.Lock(), Counter()
        self.held: list[float] = []  # seconds each dripping connection stayed open

    def add(self, kind: str, status) -> None:
        with self.lock:
            self.codes[(kind, str(status))] += 1

    def fives(self) -> int:
        return sum(n for (_, s), n in self.codes.items() if s.startswith("5"))


def normal(url: str, tally: Tally, stop: threading.Event, i: int) -> None:
    steer = {"edits": [{"layer": 2, "feature": 10 + i, "strength": 4.0}]}
    bodies = [GOOD, GOOD | {"steering": steer}, GOOD | {"logprobs": 2, "echo": True}]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        n = 0
        while not stop.is_set():
            n += 1
            if n % 4 == 3:
                with c.stream("POST", "/v1/completions", json=GOOD | {"stream": True}) as r:
                    for _ in r.iter_lines():
                        pass
                tally.add("normal", r.status_code)
                continue
            r = (
                c.post("/v1/chat/completions", json=chat)
                if n % 4 == 2
                else c.post("/v1/completions", json=bodies[n % 3])
            )
            tally.add("normal", r.status_code)


def status_of(head: bytes) -> str:
    return head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/1.1 ") else "closed"


def drip_headers(url: str, tally: Tally, stop: threading.Event) -> None:
    host, port = url.removeprefix("http://").split(":")
    while not stop.is_set():
        t0 = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            s.settimeout(None)  # blocking, so that recv(MSG_DONTWAIT) says "nothing yet" instead of timing out
            while not stop.is_set():  # a header byte every 0.3 s until the server closes the connection
                try:
                    s.sendall(b"X")
                    if s.recv(1, socket.MSG_DONTWAIT) == b"":
                        break
                except BlockingIOError:
                    time.sleep(0.3)
                except OSError:
                    break
        tally.add("drip_headers", "closed" if not stop.is_set() else "open at the end")
        tally.held.append(time.monotonic() - t0)


def absent_body(url: str, tally: Tally, stop: threading.Event) -> None:
    host, port = url.removeprefix("http://").split(":")
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    while not stop.is_set():
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(head.encode())
            try:
                tally.add("absent_body", status_of(s.recv(64)))
            except OSError:
                tally.add("absent_body", "closed")


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def gguf_bomb() -> bytes:
    key = b"controlvector.x"
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 2**63)


def attacker(url: str, tally: Tally, stop: threading.Event) -> None:
    """Bad requests in turn: each must be a 4xx."""
    user, admin = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}
    attempts = [
        ("nested_body", "POST", "/v1/completions", {"content": "[" * 200_000, "headers": user}),
        ("nested_xargs", "POST", "/v1/completions", {"json": GOOD | {"vllm_xargs": {"steering": nested(50_000)}}}),
        ("oov_echo", "POST", "/v1/completions", {"json": GOOD | {"prompt": [2**40], "echo": True}}),
        ("huge_body", "POST", "/v1/completions", {"content": b"x" * (3 << 20), "headers": user}),
        ("huge_upload", "POST", "/v1/steering/vectors", {"files": {"file": ("v.gguf", b"\0" * (20 << 20))}}),
        ("gguf_bomb", "POST", "/v1/steering/vectors", {"files": {"file": ("v.gguf", gguf_bomb())}}),
        ("norm_overflow", "POST", "/v1/steering/vectors", {"json": {"name": "v", "directions": {"3": [3e38] * 256}}}),
        ("bad_host", "GET", "/v1/models", {"headers": user | {"Host": "rebind.example"}}),
    ]
    with httpx.Client(base_url=url, headers=user, timeout=120) as c:
        i = 0
        while not stop.is_set():
            kind, method, path, kw = attempts[i % len(attempts)]
            i += 1
            if path == "/v1/steering/vectors":
                kw = kw | {"headers": admin} | ({"data": {"name": "up"}} if "files" in kw else {})
            try:
                tally.add(kind, c.request(method, path, **kw).status_code)
            except httpx.HTTPError as e:  # the server may close a 413'd upload before it is all sent
                tally.add(kind, type(e).__name__)


def churn_presets(url: str, tally: Tally, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.is_set():
            body = {"steering": {"edits": [{"layer": 2, "feature": 1, "strength": 1.0}]}}
            c.put("/v1/steering/presets/flicker", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
            c.delete("/v1/steering/presets/flicker", headers={"Authorization": f"Bearer {ADMIN}"})
            r = c.get("/v1/steering/presets", headers={"Authorization": f"Bearer {KEY}"})
            tally.add("preset_listing", r.status_code)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-time", type=float, default=150, help="seconds of load")
    ap.add_argument("--normal-users", type=int, default=3)
    ap.add_argument("--max-health-s", type=float, default=1.0)
    ap.add_argument("--max-growth-mib", type=float, default=64)
    ap.add_argument("--out", type=Path, default=Path("loadtest/results/hostile"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.out / "library"
    flags = ["--admin-api-key", ADMIN, "--data-dir", str(data_dir), "--steer-layers", "3"]
    flags += ["--header-timeout", "3", "--body-timeout", "3", "--max-tokens", "16"]
    tally, stop, health = Tally(), threading.Event(), []
    with server(None, args.out / "server.log", ["--model", "models/functok-tiny", *flags], KEY) as (url, pid):
        rss = RSSSampler(pid, 2.0)
        rss.start()
        workers = [threading.Thread(target=normal, args=(url, tally, stop, i)) for i in range(args.normal_users)]
        workers += [threading.Thread(target=f, args=(url, tally, stop)) for f in (drip_headers, drip_headers)]
        workers += [threading.Thread(target=f, args=(url, tally, stop)) for f in (absent_body, attacker, churn_presets)]
        for w in workers:
            w.daemon = True
            w.start()
        t0 = time.monotonic()
        with httpx.Client(timeout=30) as c:
            while time.monotonic() - t0 < args.run_time:
                s = time.monotonic()
                tally.add("health", c.get(f"{url}/health").status_code)
                health.append(time.monotonic() - s)
                time.sleep(0.2)
        stop.set()
        t_end = time.monotonic() - rss.t0
        for w in workers:
            w.join(60)
        rss.stop()
    third = max(len(rss.samples) // 3, 1)
    first, last = min(m for _, m in rss.samples[:third]), min(m for _, m in rss.samples[-third:])
    health.sort()
    result = {
        "run_time_s": args.run_time,
        "answers": {f"{k} {s}": n for (k, s), n in sorted(tally.codes.items())},
        "5xx": tally.fives(),
        "health": {
            "n": len(health),
            "p50_ms": round(1000 * health[len(health) // 2], 1),
            "p99_ms": round(1000 * health[int(len(health) * 0.99)], 1),
            "max_ms": round(1000 * health[-1], 1),
        },
        "drip_held_s_max": round(max(tally.held, default=0), 1),
        "rss_mib": {"first_third_floor": first, "last_third_floor": last, "peak": max(m for _, m in rss.samples)},
        "rss_floor_per_30s_mib": [
            min((m for t, m in rss.samples if k <= t < k + 30), default=None) for k in range(0, int(t_end), 30)
        ],
    }
    (args.out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    normal_ok = sum(n for (k, s), n in tally.codes.items() if k == "normal" and s == "200")
    ok = (
        tally.fives() == 0 and health[-1] <= args.max_health_s and normal_ok > 0 and last - first <= args.max_growth_mib
    )
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
