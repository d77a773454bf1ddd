"""ASGI middleware in front of the routes: the API key check, the request body size limit, per-request metrics."""

from __future__ import annotations

import hmac
import json

from functok_vllm.server.errors import APIError
from functok_vllm.server.metrics import Metrics

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


class Gate:
    """Answers 401 without a valid bearer token on /v1/* (when a key is set) and 413 for oversized bodies; counts
    every request to the generation endpoints by status code and by `request.state.steered` (set by the route)."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body_bytes: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = GENERATION_PATHS.get(scope["path"])
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
                await self.app(scope, receive, send_counting)
        finally:
            if endpoint is not None:
                self.metrics.requests.labels(endpoint, str(status), state.get("steered", "unknown")).inc()

    async def _check(self, scope, receive):
        """(error or None, the receive callable the app should use)."""
        if self.key is not None and scope["path"].startswith("/v1/"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.key):
                why = "no API key was given" if not got else "the API key is not valid"
                return APIError(401, f"{why}; send 'Authorization: Bearer <key>'", code="invalid_api_key"), receive
        length = dict(scope["headers"]).get(b"content-length")
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
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
