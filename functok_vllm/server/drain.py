"""Graceful shutdown: on SIGTERM or SIGINT, refuse new requests with 503, let in-flight ones finish, then exit 0.

`Drain` is shared by the `Gate` middleware (which counts the requests in flight and answers 503 while draining) and
`DrainingServer`, a uvicorn server whose signal handler starts the drain instead of stopping at once. The listening
socket stays open while draining, so new requests get a clear 503 (with Retry-After) rather than a refused connection.
In-flight requests get `limits.drain_timeout` seconds (a second signal cuts that short); then the engine is stopped,
which ends what is left with 503 (or a final error event in a stream), and the server exits. The process exits 0
either way: uvicorn's own handler re-raises the signal after shutting down, which would make the exit status -15.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import uvicorn

log = logging.getLogger("functok.server")
GRACE_AFTER_ABORT_S = 10.0  # after stopping the engine, how long to wait for the aborted responses to go out


class Drain:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.inflight = 0  # requests the app is handling (counted by the Gate)
        self.since: float | None = None  # time.monotonic() when the drain began

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def waited(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with a draining first signal; `stop_engine` aborts what is still running at the deadline or
    on a second signal, and the server exits once those aborted responses have gone out."""

    def __init__(self, config: uvicorn.Config, drain: Drain, stop_engine: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self.drain, self.stop_engine = drain, stop_engine
        self.announced = self.hurry = False
        self.aborted_at: float | None = None

    def handle_exit(self, sig, frame) -> None:  # a signal handler: set flags only (no logging, no awaiting)
        if self.drain.draining:
            self.hurry = True
        else:
            self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        d = self.drain
        if not d.draining:
            return False
        if not self.announced:
            self.announced = True
            log.info("draining: %d requests in flight, %gs to finish; new requests get 503", d.inflight, d.timeout)
        if d.inflight == 0:
            log.info("drained after %.1fs; shutting down", d.waited())
            return True
        if self.aborted_at is None and (self.hurry or d.waited() > d.timeout):
            self.aborted_at = time.monotonic()
            why = "a second signal" if self.hurry else f"drain timeout ({d.timeout:g}s)"
            log.warning("%s: aborting the %d requests still in flight", why, d.inflight)
            await self.stop_engine()
        return self.aborted_at is not None and time.monotonic() - self.aborted_at > GRACE_AFTER_ABORT_S
