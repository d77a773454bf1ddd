"""Start a server on a free loopback port and wait for its /health: the one launcher of tests, benchmarks, load tests.

    with launch(functok_serve("--engine", "hf"), log=Path("server.log")) as srv:
        httpx.get(srv.url + "/v1/models")

Works for `functok serve` and stock `vllm serve` alike (both take `--port` and answer `GET /health`). The process
runs in its own session, so stopping it (SIGTERM, then SIGKILL after a grace period) also ends what it started
(vLLM's engine core and workers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.3  # between /health probes, also after a non-200 answer: no busy loop against a starting server


class ServerStartError(RuntimeError):
    """The server exited, or did not answer /health in time; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def functok_serve(*args: str) -> list[str]:
    """The command line of `functok serve ARGS` with this interpreter (no --port: `launch` adds it)."""
    return [sys.executable, "-m", "functok_vllm.cli", "serve", *args]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path | None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.is_file() else ""

    def stop(self, grace_s: float = 60) -> int:
        """SIGTERM the server's process group, SIGKILL it after `grace_s`; the server's exit status."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.wait()


def start(cmd: list[str], log: Path | None = None, env: dict | None = None, timeout_s: float = 300) -> Server:
    """Run `cmd --port PORT` on a free loopback port; the Server once GET /health answers 200. ServerStartError (the
    process stopped) if it exits first or does not answer within `timeout_s`."""
    port = free_port()
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115  (closed below, kept by the child)
    try:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    finally:
        if log is not None:
            out.close()
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_healthy(srv.url, timeout_s, proc)
    except ServerStartError as e:
        srv.stop(grace_s=10)
        raise ServerStartError(f"{e}:\n{srv.log_tail()}") from None
    return srv


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Return once GET url/health answers 200; ServerStartError if `proc` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(f"the server exited with status {proc.returncode} before /health answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet, or a non-200 answer (urllib raises HTTPError, an OSError)
            pass
        time.sleep(POLL_S)
    raise ServerStartError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


@contextmanager
def launch(cmd: list[str], log: Path | None = None, env: dict | None = None, timeout_s: float = 300):
    """`start` as a context manager: the server is stopped when the block ends."""
    srv = start(cmd, log, env, timeout_s)
    try:
        yield srv
    finally:
        srv.stop()
