"""What several test modules share: the prompt set, a `functok serve` subprocess on loopback, and readers of its
error bodies and metrics. A plain module (tests import it by name; pytest puts tests/ on the path)."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

PROMPTS = [
    "The king said to his son",
    "Once upon a time, there was a",
    "She walked into the room and",
    "War is",
    "My dear friend, I have written to you because",
    "It was the best of",
]


class ServerProc:
    """`functok serve ARGS` on a free loopback port, its output in `log`; ready once GET /health answers 200."""

    def __init__(self, tmp: Path, *args: str, config: dict | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "functok_vllm.cli", "serve", "--port", str(port), *args]
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config))
            cmd += ["--config", str(tmp / "config.json")]
        self.url, self.log = f"http://127.0.0.1:{port}", tmp / "server.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)  # also after a non-200 answer: no busy loop against a starting server
        self.stop()
        pytest.fail(f"server did not start:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def is_error_body(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert code is None or err["code"] == code, err
    return err


def metric(http, name: str, **labels) -> float:
    """The value of one sample on /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in http.get("/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or (want and head.startswith(name + "{") and all(p in head for p in want.split(","))):
            return float(value)
    return 0.0


def wait_idle(http, deadline_s=60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if metric(http, "functok:num_requests_running") == metric(http, "functok:num_requests_waiting") == 0:
            return
        time.sleep(0.1)
    pytest.fail("the server did not become idle")


def batch_state(saes, function_tokens, max_clamps: int):
    """A vLLM worker's per-step steering state (`BatchSteering`) over the demo SAEs, parsing specs as the worker does;
    no vLLM engine needed."""
    from functok_vllm.core import SteeringTable
    from functok_vllm.engines.vllm.batch_state import BatchSteering
    from functok_vllm.engines.vllm.config import from_additional_config
    from functok_vllm.engines.vllm.worker import _local_spec

    table = SteeringTable(saes, max_slots=8, max_clamps=max_clamps, max_tokens=256)
    cfg = from_additional_config({})
    return BatchSteering(
        table, function_tokens.mask(8192), lambda value, extra=None: _local_spec(value, cfg, table, extra)
    )
