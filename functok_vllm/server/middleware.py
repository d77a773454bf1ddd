"""ASGI middleware in front of the routes: the Host allow-list, the API keys, draining, the request body's size and
deadline, per-request metrics.

Two keys: the user key (`--api-key`) for every API call, and the admin key (`--admin-api-key`) for changes to the
steering library (POST/PUT/DELETE under `LIBRARY_PREFIXES`); the admin key is accepted wherever the user key is.
Without an admin key the library is read-only over HTTP (403)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

from functok_vllm.server.drain import Drain
from functok_vllm.server.metrics import Metrics
from functok_vllm.server.openai_errors import APIError

COUNTED_PATHS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/analysis/reactivation": "analysis_reactivation",
}
OPEN_PATHS = ("/health", "/")  # answer without the API key (/: the playground page); /metrics unless configured
OPEN_PREFIXES = ("/static/",)  # the page's own files (the API they call still needs the key)
LIBRARY_PREFIXES = ("/v1/steering/vectors", "/v1/steering/presets")  # writes need the admin key
VECTOR_PREFIX = "/v1/steering/vectors"  # writes here may be as large as max_vector_bytes (uploads)
WRITES = ("POST", "PUT", "PATCH", "DELETE")


class Gate:
    """In this order: 400 for a Host header not in `allowed_hosts` (None: any), 401 without a valid bearer token (when
    a key is set; every path but the open ones), 503 while the server drains (see `drain.py`), 413 for oversized
    bodies, 408 (and the connection closed) for a body not received within `body_timeout` seconds. Counts the
    requests in flight for the drain, and every request to the counted endpoints by status code and by
    `request.state.steered` (set by the route)."""

    def __init__(
        self,
        app,
        metrics: Metrics,
        api_key: str | None,
        max_body_bytes: int,
        drain: Drain,
        metrics_public,
        admin_key: str | None = None,
        max_vector_bytes: int | None = None,
        allowed_hosts: tuple[str, ...] | None = None,
        body_timeout: float = 30.0,
    ):
        self.app, self.metrics, self.max_body, self.drain = app, metrics, max_body_bytes, drain
        self.hosts, self.body_timeout = (set(allowed_hosts) if allowed_hosts else None), body_timeout
        self.max_vector_body = max_vector_bytes or max_body_bytes
        self.key = _digest(api_key.encode()) if api_key else None
        self.admin = _digest(admin_key.encode()) if admin_key else None
        self.open = set(OPEN_PATHS) | ({"/metrics"} if metrics_public else set())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = COUNTED_PATHS.get(scope["path"])
        status = 500
        state = scope.setdefault("state", {})

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error, receive = await self._check(scope, receive)
            if error is not None:
                await _send_error(send_counting, error)
            else:
                self.drain.inflight += 1
                try:
                    await self.app(scope, receive, send_counting)
                finally:
                    self.drain.inflight -= 1
        finally:
            if endpoint is not None:
                self.metrics.requests.labels(endpoint, str(status), state.get("steered", "unknown")).inc()

    async def _check(self, scope, receive):
        """(error or None, the receive callable the app should use)."""
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.hosts is not None and not _host_allowed(headers.get(b"host"), self.hosts):
            msg = (
                f"the Host header {_shown_host(headers.get(b'host'))} is not one this server answers (--allowed-hosts)"
            )
            return APIError(400, msg, code="invalid_host"), receive
        error = self._auth(path, scope["method"], headers.get(b"authorization", b""))
        if error is not None:
            return error, receive
        if self.drain.draining and path != "/metrics":
            msg = "the server is shutting down and takes no new requests"
            return APIError(503, msg, code="draining", headers={"Retry-After": "5", "Connection": "close"}), receive
        vectors = path.startswith(VECTOR_PREFIX)
        limit, flag = (self.max_vector_body, "--max-vector-bytes") if vectors else (self.max_body, "--max-body-bytes")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return _too_large(int(length), limit, flag), receive
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None, receive
        body, more = [], True  # read the whole body now, refusing it once it passes the limit (chunked uploads too)
        size, deadline = 0, time.monotonic() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                msg = f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)"
                return APIError(408, msg, code="body_timeout", headers={"Connection": "close"}), receive
            if message["type"] != "http.request":
                return None, _replay([], message, receive)
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > limit:
                return _too_large(size, limit, flag), receive
        return None, _replay(body, None, receive)

    def _auth(self, path: str, method: str, got: bytes) -> APIError | None:
        scheme, _, token = got.partition(b" ")
        token = _digest(token.strip()) if scheme.lower() == b"bearer" else b""
        is_admin = self.admin is not None and hmac.compare_digest(token, self.admin)  # digests: constant time
        if method in WRITES and path.startswith(LIBRARY_PREFIXES):
            if is_admin:
                return None
            if self.admin is None:
                msg = "the steering library is read-only on this server (start it with --admin-api-key to change it)"
                return APIError(403, msg, code="library_read_only")
            if self.key is not None and token and hmac.compare_digest(token, self.key):
                return APIError(403, "changing the steering library needs the admin API key", code="admin_key_needed")
            why = "no API key was given" if not got else "the API key is not the admin key"
            return APIError(401, f"{why}; send 'Authorization: Bearer <admin key>'", code="invalid_api_key")
        if self.key is None or path in self.open or path.startswith(OPEN_PREFIXES) or is_admin:
            return None
        if not hmac.compare_digest(token or _digest(b""), self.key):
            why = "no API key was given" if not got else "the API key is not valid"
            return APIError(401, f"{why}; send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return None


def _host_allowed(host: bytes | None, allowed: set[str]) -> bool:
    """Whether a Host header names an allowed host (its port ignored; an HTTP/1.0 request without one passes)."""
    if host is None:
        return True
    name = host.decode("latin-1").strip().lower()
    name = name[1:].partition("]")[0] if name.startswith("[") else name.rpartition(":")[0] if ":" in name else name
    return name in allowed


def _shown_host(host: bytes | None) -> str:
    return repr(host.decode("latin-1")[:100]) if host is not None else "(none)"


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _too_large(size: int, limit: int, flag: str) -> APIError:
    msg = f"the request body has {size} bytes or more; the limit is {limit} ({flag})"
    return APIError(413, msg, code="request_too_large")


def _replay(chunks: list[bytes], pending, receive):
    """A receive callable that first returns the buffered body, then defers to the server's (disconnects)."""
    first = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}] if pending is None else [pending]

    async def replay():
        return first.pop() if first else await receive()

    return replay


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
