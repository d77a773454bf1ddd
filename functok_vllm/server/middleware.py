"""ASGI middleware in front of the routes: the API key, draining, the request body size limit, per-request metrics."""

from __future__ import annotations

import hashlib
import hmac
import json

from functok_vllm.server.drain import Drain
from functok_vllm.server.errors import APIError
from functok_vllm.server.metrics import Metrics

COUNTED_PATHS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/analysis/reactivation": "analysis_reactivation",
}
OPEN_PATHS = ("/health", "/")  # answer without the API key (/: the playground page); /metrics unless configured
OPEN_PREFIXES = ("/static/",)  # the page's own files (the API they call still needs the key)


class Gate:
    """In this order: 401 without a valid bearer token (when a key is set; every path but the open ones), 503 while the
    server drains (see `drain.py`), 413 for oversized bodies. Counts the requests in flight for the drain, and every
    request to the counted endpoints by status code and by `request.state.steered` (set by the route)."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body_bytes: int, drain: Drain, metrics_public):
        self.app, self.metrics, self.max_body, self.drain = app, metrics, max_body_bytes, drain
        self.key = _digest(api_key.encode()) if api_key else None
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
        if self.key is not None and scope["path"] not in self.open and not scope["path"].startswith(OPEN_PREFIXES):
            got = headers.get(b"authorization", b"")
            scheme, _, token = got.partition(b" ")
            same = hmac.compare_digest(_digest(token.strip()), self.key)  # digests: equal lengths, constant time
            if not (same and scheme.lower() == b"bearer"):
                why = "no API key was given" if not got else "the API key is not valid"
                return APIError(401, f"{why}; send 'Authorization: Bearer <key>'", code="invalid_api_key"), receive
        if self.drain.draining and scope["path"] != "/metrics":
            msg = "the server is shutting down and takes no new requests"
            return APIError(503, msg, code="draining", headers={"Retry-After": "5", "Connection": "close"}), receive
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return _too_large(int(length), self.max_body), receive
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None, receive
        body, more = [], True  # read the whole body now, refusing it once it passes the limit (chunked uploads too)
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None, _replay([], message, receive)
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return _too_large(size, self.max_body), receive
        return None, _replay(body, None, receive)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {size} bytes or more; the limit is {limit}", code="request_too_large")


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
