"""Turn the engines' deltas into OpenAI responses: one JSON body, or server-sent events ending in `data: [DONE]`.

A request's choices (`choices.py`) are separate engine requests decoded in the same batch; the whole body waits for
all of them, a stream interleaves their chunks as they come (each chunk names its choice's `index`). The deadline
and a client that disconnects abort every choice still running; so does one that fails (its error ends the stream).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from functok_vllm.engines.base import Delta
from functok_vllm.server.choices import Choice, Format
from functok_vllm.server.finite import dumps
from functok_vllm.server.metrics import Metrics
from functok_vllm.server.openai_errors import APIError
from functok_vllm.server.protocol import Steering


@dataclass
class Job:
    """One generation request on its way out: its choices, and what the response needs besides them."""

    kind: str  # "chat" or "completions"
    request_id: str
    model: str
    choices: list[Choice]
    fmt: Format
    steering: Steering | None  # a single spec's (reported at the top level too); None when `steering` was a list
    include_usage: bool
    t0: float  # arrival, time.monotonic()
    timeout: float  # seconds from arrival to the last token (limits.request_timeout)
    created: int = field(default_factory=lambda: int(time.time()))
    seen_first: bool = False

    def take(self, c: Choice, d: Delta, metrics: Metrics) -> None:
        if not self.seen_first:
            self.seen_first = True
            metrics.ttft.observe(time.monotonic() - self.t0)
        c.take(d)
        if d.finish_reason is not None:
            metrics.e2e.observe(time.monotonic() - self.t0)
            metrics.prompt_tokens.inc(d.prompt_tokens)
            metrics.generation_tokens.inc(d.completion_tokens)
            metrics.steered_positions.inc(d.steered_positions)
            metrics.finished.labels(d.finish_reason, _steered(c)).inc()
            first = len(self.fmt.readout.probes) if self.fmt.readout is not None else 0
            metrics.monitors.observe(d.readout, first, d.prompt_tokens, d.completion_tokens)

    @property
    def deadline(self) -> float:
        return self.t0 + self.timeout

    def count_unfinished(self, reason: str, metrics: Metrics) -> None:
        for c in self.choices:
            if not c.finished:
                metrics.finished.labels(reason, _steered(c)).inc()

    def usage(self) -> dict:
        """Prompt tokens once per prompt (as OpenAI counts them for n); completion tokens of every choice."""
        prompts = {id(c.prompt): c.prompt for c in self.choices}.values()
        prompt = sum(len(p.ids) for p in prompts)
        done = sum(c.last.completion_tokens if c.last else 0 for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def top_steering(self) -> dict:
        """The top-level `steering` of a single-spec request: its report, positions summed over the choices."""
        if self.steering is None:
            return {}
        total = sum(c.last.steered_positions if c.last else 0 for c in self.choices)
        return {"steering": self.steering.report(total)}

    def envelope(self, chunk: bool) -> dict:
        obj = (
            "text_completion"
            if self.kind == "completions"
            else ("chat.completion.chunk" if chunk else "chat.completion")
        )
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}


def _steered(c: Choice) -> str:
    return str(c.steering.spec is not None).lower()


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


async def _pump(c: Choice, out: asyncio.Queue) -> None:
    """Every delta of choice `c` into `out` as (choice, delta), its first included; a failure as (choice, error)."""
    d = c.first
    try:
        while True:
            await out.put((c, d))
            if d.finish_reason is not None:
                return
            d = await anext(c.deltas)
    except Exception as e:  # the engine's stream broke off without a last delta
        await out.put((c, e))


async def _next(queue: asyncio.Queue) -> tuple[Choice, Delta]:
    c, d = await queue.get()
    if isinstance(d, Exception):
        raise APIError(500, f"generation failed: {type(d).__name__}", code="engine_error")
    return c, d


async def close_all(tasks, choices: list[Choice]) -> None:
    """Cancel the pumps (a cancelled `anext` aborts its engine request) and close every choice's deltas."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in choices:
        if c.deltas is not None:
            await c.deltas.aclose()


async def complete(job: Job, request: Request, metrics: Metrics) -> dict:
    """The whole response as one JSON object; a client that disconnects first, or the deadline, aborts generation."""
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(c, queue)) for c in job.choices]

    async def drain():
        left = len(job.choices)
        while left:
            c, d = await _next(queue)
            job.take(c, d, metrics)
            _raise_for(d)
            left -= d.finish_reason is not None

    work = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        left = max(job.deadline - time.monotonic(), 0)
        done, _ = await asyncio.wait({work, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            if gone not in done:
                job.count_unfinished("timeout", metrics)
                raise timeout_error(job.timeout)
            job.count_unfinished("abort", metrics)
            raise APIError(499, "the client disconnected", code="client_disconnected")  # nginx's "client closed"
        work.result()
    finally:
        gone.cancel()
        work.cancel()
        await close_all(pumps, job.choices)
    return {
        **job.envelope(chunk=False),
        "choices": [c.whole(job.fmt) for c in job.choices],
        "usage": job.usage(),
        **job.top_steering(),
    }


async def stream(job: Job, metrics: Metrics) -> AsyncIterator[str]:
    """Server-sent events. A disconnect cancels this generator, whose cleanup aborts every choice still running; the
    deadline ends the stream with an error event (code "timeout") and `data: [DONE]`."""
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(c, queue)) for c in job.choices]
    ended = False
    try:
        if job.kind == "chat":
            for c in job.choices:
                yield _event(job.envelope(True) | {"choices": [c.role_chunk()]})
        left = len(job.choices)
        while left:
            try:
                c, d = await asyncio.wait_for(_next(queue), max(job.deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                job.count_unfinished("timeout", metrics)
                ended = True
                yield _event(timeout_error(job.timeout).body())
                break
            except APIError as e:  # a choice's stream broke off
                job.count_unfinished("error", metrics)
                ended = True
                yield _event(e.body())
                break
            job.take(c, d, metrics)
            if d.finish_reason in ("error", "abort"):
                job.count_unfinished("abort", metrics)
                ended = True
                try:
                    _raise_for(d)
                except APIError as e:
                    yield _event(e.body())
                break
            left -= d.finish_reason is not None
            body = c.chunk(job.fmt, d)
            if body is not None:
                chunk = job.envelope(True) | {"choices": [body]}
                if not left:
                    chunk |= job.top_steering()
                yield _event(chunk)
        ended = True
        if job.include_usage and all(c.finished and c.last.finish_reason in ("stop", "length") for c in job.choices):
            yield _event(job.envelope(True) | {"choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"
    finally:
        if not ended:
            job.count_unfinished("abort", metrics)
        await close_all(pumps, job.choices)


def _event(obj: dict) -> str:
    return f"data: {dumps(obj)}\n\n"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
