"""One choice of a generation response: its engine request's deltas accumulated, and its OpenAI form, whole or chunk.

A request fans out into choices: one per (prompt, steering spec, sample), in that order (`choices[i].index == i`),
each its own engine request so the engines decode them together in one batch. Sample j of a request with `seed` s
uses seed s for j = 0 and `choice_seed(s, j)` after, whatever the prompt and spec: the same spec sent alone with the
same seed returns the same choice, and the specs of a list share their random draws (a fair comparison).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from functok_vllm.engines.base import Delta
from functok_vllm.readout_request import ReadoutRequest, pooled
from functok_vllm.server.logprobs import TokenText, chat_logprobs, completion_logprobs, echo_logprobs
from functok_vllm.server.protocol import Steering
from functok_vllm.stop_when import StopWhen

SEED_STEP = 0x9E3779B97F4A7C15  # an odd 64-bit constant: seeds of consecutive samples far apart


def choice_seed(seed: int | None, j: int) -> int | None:
    if seed is None or j == 0:
        return seed
    return (seed + j * SEED_STEP) % (1 << 63)


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what `echo` puts in front (the prompt string, or its token ids decoded)
    roles: list[int] | None = None  # a chat prompt's role codes (`chat_roles`), when a spec selects by role


@dataclass
class Format:
    """What every choice of one request carries besides its text."""

    kind: str  # "chat" or "completions"
    tt: TokenText
    logprobs: bool = False  # completions: `logprobs` given; chat: `logprobs: true`
    echo: bool = False
    return_token_ids: bool = False
    features: bool = False
    prompt_features: bool = False
    capture: bool = False
    readout: ReadoutRequest | None = None  # the request's own series (the engine reads the monitors' after them)
    stop_when: StopWhen | None = None  # its monitor (its series follows the request's own)


@dataclass(eq=False)
class Choice:
    index: int
    prompt: Prompt
    steering: Steering
    deltas: AsyncIterator[Delta] | None = None
    first: Delta | None = None  # read before the response starts (a refused request raises there)
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    lps: list = field(default_factory=list)
    prompt_lps: list = field(default_factory=list)
    features: list = field(default_factory=list)
    prompt_features: list = field(default_factory=list)
    capture: bytes | None = None  # the engine's safetensors blob, from the last delta
    readout: dict | None = None  # the engine's readout (every series, the monitors' too), from the last delta
    last: Delta | None = None
    offset: int = 0  # completions text_offset of the next streamed token
    started: bool = False  # its first chunk has been sent

    def take(self, d: Delta) -> None:
        self.pieces.append(d.text)
        self.token_ids += d.token_ids
        self.lps += d.logprobs or ()
        self.prompt_lps += d.prompt_logprobs or ()
        self.features += d.features or ()
        self.prompt_features += d.prompt_features or ()
        self.capture = d.capture or self.capture
        self.readout = d.readout or self.readout
        self.last = d

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finish_reason is not None

    def report(self) -> dict | None:
        return self.steering.report(self.last.steered_positions if self.last else 0)

    def whole(self, fmt: Format) -> dict:
        text = "".join(self.pieces)
        if fmt.kind == "chat":
            body = {"index": self.index, "message": {"role": "assistant", "content": text}}
            body["logprobs"] = chat_logprobs(self.lps, fmt.tt) if fmt.logprobs else None
        else:
            body = {"index": self.index, "text": self.prompt.text + text if fmt.echo else text}
            body["logprobs"] = self._completion_lps(fmt, self.prompt_lps, self.lps, 0) if fmt.logprobs else None
        body["finish_reason"] = self.last.finish_reason
        if fmt.return_token_ids:
            body["token_ids"] = self.token_ids
            if fmt.echo:
                body["prompt_token_ids"] = self.prompt.ids
        body["steering"] = self.report()
        if fmt.features:
            body["features"] = self.features
        if fmt.prompt_features:
            body["prompt_features"] = self.prompt_features
        if fmt.capture:
            body["capture"] = capture_object(self.capture)
        if fmt.readout is not None:
            body["readout"] = readout_object(fmt.readout, self.readout)
        if fmt.stop_when is not None:
            body["monitor"] = monitor_object(fmt.stop_when, self.readout, len(self.prompt.ids))
        return body

    def chunk(self, fmt: Format, d: Delta) -> dict | None:
        """The streamed choice for delta `d` (already taken), or None when it carries nothing to send."""
        first, finish = not self.started, d.finish_reason
        asked = fmt.return_token_ids or fmt.logprobs or fmt.features
        if not (d.text or finish or (d.token_ids and asked) or d.prompt_features or (first and fmt.echo)):
            return None
        self.started = True
        if fmt.kind == "chat":
            body = {"index": self.index, "delta": {"content": d.text}}
            body["logprobs"] = chat_logprobs(d.logprobs or [], fmt.tt) if fmt.logprobs else None
        else:
            echo = first and fmt.echo
            body = {"index": self.index, "text": self.prompt.text + d.text if echo else d.text}
            prompt_lps = (d.prompt_logprobs or []) if echo else []
            body["logprobs"] = None
            if fmt.logprobs:
                body["logprobs"] = self._completion_lps(fmt, prompt_lps, d.logprobs or [], self.offset, echo)
                self.offset = _end(body["logprobs"], self.offset)
        body["finish_reason"] = finish
        if fmt.return_token_ids:
            body["token_ids"] = d.token_ids
        if fmt.features:
            body["features"] = d.features or []
            if fmt.prompt_features and d.prompt_features:
                body["prompt_features"] = d.prompt_features
        if finish is not None:
            body["steering"] = self.report()
            if fmt.capture:
                body["capture"] = capture_object(self.capture)
            if fmt.readout is not None:
                body["readout"] = readout_object(fmt.readout, self.readout)
            if fmt.stop_when is not None:
                body["monitor"] = monitor_object(fmt.stop_when, self.readout, len(self.prompt.ids))
        return body

    def role_chunk(self) -> dict:
        return {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}

    def _completion_lps(self, fmt: Format, prompt_lps, lps, offset: int, echo: bool | None = None) -> dict:
        if fmt.echo if echo is None else echo:
            return echo_logprobs(self.prompt.ids, prompt_lps, lps, fmt.tt)
        return completion_logprobs(lps, fmt.tt, offset)


def capture_object(blob: bytes | None) -> dict | None:
    """A choice's `capture`: the safetensors blob as base64 (`activation_capture.read_capture` reads it back);
    None when the request ended without one (aborted, failed)."""
    if blob is None:
        return None
    return {"format": "safetensors", "encoding": "base64", "bytes": len(blob), "data": base64.b64encode(blob).decode()}


def readout_object(req: ReadoutRequest, got: dict | None) -> dict | None:
    """A choice's `readout`: the positions read, their tokens, and one entry per series the request named (its
    label, its value at each position, pooled); None when the request ended without one (aborted, failed)."""
    if got is None:
        return None
    series = []
    for j, label in enumerate(req.labels):
        values = [row[j] for row in got["values"]]
        series.append({**label, "values": values, "pooled": pooled(values, req.pool)})
    return {"positions": got["positions"], "token_ids": got["token_ids"], "series": series}


def monitor_object(stop: StopWhen, got: dict | None, prompt_len: int) -> dict | None:
    """A choice's `monitor`: its series' value at each position that predicted a generated token, and whether (and
    at which generated token, `token_index`) `tokens` consecutive values held; None without a readout (aborted)."""
    if got is None:
        return None
    rows = [
        (p, row[stop.series]) for p, row in zip(got["positions"], got["values"], strict=True) if p >= prompt_len - 1
    ]
    values = [v for _, v in rows]
    at = stop.trigger(values)
    out = {**stop.label, "action": stop.action, "triggered": at is not None, "values": values}
    if at is not None:
        out |= {"token_index": at, "position": rows[at][0], "value": values[at]}
    return out


def _end(lp: dict, offset: int) -> int:
    """The text offset after the tokens of a completions logprobs object."""
    if not lp["tokens"]:
        return offset
    return lp["text_offset"][-1] + len(lp["tokens"][-1] or "")
