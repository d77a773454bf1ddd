"""Turn an engine's deltas into OpenAI responses: one JSON body, or server-sent events ending in `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from functok_vllm.engines.base import Delta
from functok_vllm.server.errors import APIError
from functok_vllm.server.metrics import Metrics
from functok_vllm.server.protocol import Steering


@dataclass
class Job:
    """One generation request on its way out: what the response needs besides the deltas."""

    kind: str  # "chat" or "completions"
    request_id: str
    model: str
    steering: Steering
    return_token_ids: bool
    include_usage: bool
    t0: float  # arrival, time.monotonic()
    timeout: float  # seconds from arrival to the last token (limits.request_timeout)
    created: int = field(default_factory=lambda: int(time.time()))
    pieces: list[str] = field(default_factory=list)  # joined once by `text` (+= on a str would copy per token)
    token_ids: list[int] = field(default_factory=list)
    last: Delta | None = None

    def take(self, d: Delta, metrics: Metrics) -> None:
        if self.last is None:
            metrics.ttft.observe(time.monotonic() - self.t0)
        self.pieces.append(d.text)
        self.token_ids += d.token_ids
        self.last = d
        if d.finish_reason is not None:
            metrics.e2e.observe(time.monotonic() - self.t0)
            metrics.prompt_tokens.inc(d.prompt_tokens)
            metrics.generation_tokens.inc(d.completion_tokens)
            metrics.steered_positions.inc(d.steered_positions)
            metrics.finished.labels(d.finish_reason, str(self.steering.spec is not None).lower()).inc()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def deadline(self) -> float:
        return self.t0 + self.timeout

    def timed_out(self, metrics: Metrics) -> APIError:
        metrics.finished.labels("timeout", str(self.steering.spec is not None).lower()).inc()
        return timeout_error(self.timeout)

    def usage(self) -> dict:
        d = self.last
        return {
            "prompt_tokens": d.prompt_tokens,
            "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens,
        }

    def envelope(self, chunk: bool) -> dict:
        obj = (
            "text_completion"
            if self.kind == "completions"
            else ("chat.completion.chunk" if chunk else "chat.completion")
        )
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, text: str, ids: list[int], finish: str | None, first: bool = False) -> dict:
        if self.kind == "chat":
            body = {"index": 0, "delta": ({"role": "assistant", "content": text} if first else {"content": text})}
        else:
            body = {"index": 0, "text": text}
        body |= {"logprobs": None, "finish_reason": finish}
        if self.return_token_ids:
            body["token_ids"] = ids
        return body


def timeout_error(limit: float) -> APIError:
    msg = f"the request did not finish within this server's limit of {limit:g} s (request_timeout); it was aborted"
    return APIError(504, msg, code="timeout")


async def next_delta(deltas: AsyncIterator[Delta], deadline: float) -> Delta:
    """The next delta; asyncio.TimeoutError once `deadline` (time.monotonic()) passes first, after closing `deltas`
    (which aborts the request and frees its place in the batch)."""

    async def take():
        return await anext(deltas)

    try:
        return await asyncio.wait_for(take(), max(deadline - time.monotonic(), 0))
    except asyncio.TimeoutError:
        await deltas.aclose()
        raise


def _raise_for(d: Delta) -> None:
    if d.finish_reason == "error":
        raise APIError(500, f"generation failed: {d.error}", code="engine_error")
    if d.finish_reason == "abort":
        raise APIError(503, "the request was aborted (the server is shutting down)", code="aborted")


async def complete(job: Job, first: Delta, deltas: AsyncIterator[Delta], request: Request, metrics: Metrics) -> dict:
    """The whole response as one JSON object; a client that disconnects first, or the deadline, aborts generation."""

    async def drain():
        job.take(first, metrics)
        if first.finish_reason is None:
            async for d in deltas:
                job.take(d, metrics)

    work = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(_disconnected(request))
    left = max(job.deadline - time.monotonic(), 0)
    done, _ = await asyncio.wait({work, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if work not in done:
        work.cancel()  # the cancelled drain closes `deltas`, which aborts the request and frees its batch place
        await asyncio.gather(work, return_exceptions=True)
        await deltas.aclose()
        if gone not in done:
            raise job.timed_out(metrics)
        metrics.finished.labels("abort", str(job.steering.spec is not None).lower()).inc()
        raise APIError(499, "the client disconnected", code="client_disconnected")  # nginx's "client closed request"
    work.result()
    _raise_for(job.last)
    d = job.last
    text = job.text
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice |= {"logprobs": None, "finish_reason": d.finish_reason}
    if job.return_token_ids:
        choice["token_ids"] = job.token_ids
    return {
        **job.envelope(chunk=False),
        "choices": [choice],
        "usage": job.usage(),
        "steering": job.steering.report(d.steered_positions),
    }


async def stream(job: Job, first: Delta, deltas: AsyncIterator[Delta], metrics: Metrics) -> AsyncIterator[str]:
    """Server-sent events. A disconnect cancels this generator inside `deltas`, whose cleanup aborts the request; the
    deadline ends the stream with an error event (code "timeout") and `data: [DONE]`."""
    finished = False
    try:
        if job.kind == "chat":
            yield _event(job.envelope(True) | {"choices": [job.choice("", [], None, first=True)]})
        d = first
        while True:
            job.take(d, metrics)
            finished = d.finish_reason is not None
            if d.finish_reason in ("error", "abort"):
                try:
                    _raise_for(d)
                except APIError as e:
                    yield _event(e.body())
                break
            if d.text or d.token_ids and job.return_token_ids or finished:
                chunk = job.envelope(True) | {"choices": [job.choice(d.text, d.token_ids, d.finish_reason)]}
                if finished:
                    chunk["steering"] = job.steering.report(d.steered_positions)
                yield _event(chunk)
            if finished:
                break
            try:
                d = await next_delta(deltas, job.deadline)
            except asyncio.TimeoutError:
                finished = True  # counted as "timeout", not "abort"
                yield _event(job.timed_out(metrics).body())
                break
        if job.include_usage and job.last.finish_reason in ("stop", "length"):
            yield _event(job.envelope(True) | {"choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            metrics.finished.labels("abort", str(job.steering.spec is not None).lower()).inc()
        await deltas.aclose()


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
