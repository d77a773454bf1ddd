"""Readouts and captures on a vLLM worker: which rows of each step a request's `readout` or `capture` reads, and what
it keeps of them.

The series travel on the side channel of `features` (`feature_op.py`): the request carries its probes in
`extra_args["functok_readout"]` (`ReadoutRequest.to_dict`: feature ids and unit directions, plain data); the feature
readout op, which runs right after the steering op at every steering layer, hands the stream before and after this
layer's edits to `SeriesReadout.observe` when the step has a plan. `prepare` (host-side, before each forward) plans, for
each running request that reads series, the tokens of its rows whose positions it has not read yet (every prompt
position with `prompt`, else from the last prompt position on: chunked prefill and a recomputation after preemption read
each position once), batched by ProbeSet: `observe` gathers the rows of every request reading the same series at once,
computes `ProbeSet.values` once and notes each request's slice of it (no tensor op per request; `take` gathers them).
`CaptureCopy` does the same for a request's `capture` (`extra_args["functok_capture"]`), one request a batch: every
position from the first prompt token on, a copy of its rows at each captured layer (only the latest row for
`positions: "last"`). The API process takes a request's values or rows once, when it has finished
(`collective_rpc("functok_readout")`, `collective_rpc("functok_request_capture")`), and forms the answer there; a
`stop_when` "stop" request's series is also read while it runs (`peek`, `collective_rpc("functok_monitor")`).

Before or after the edits: the op is given the steering op's input (the edits upstream applied, this layer's not: the
transformers engine's "before") and its output, so a request with `edits: "before"` has its rows gathered from the
first in the same op, and a batch mixing both reads each from its own tensor. A request without `readout` or
`capture` costs a dictionary lookup per step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from functok_vllm.activation_capture import CaptureRequest
from functok_vllm.core.readout import ProbeSets
from functok_vllm.readout_request import ReadoutRequest

log = logging.getLogger("functok.vllm")
XREAD = "functok_readout"  # extra_args key: ReadoutRequest.to_dict() (set by functok's VLLMEngine or a Python caller)
XCAPTURE = "functok_capture"  # extra_args key: CaptureRequest.to_dict()
KEEP_DONE = 64  # finished requests whose values wait to be taken


@dataclass
class Piece:
    """Positions [start, start + count) of one request, read in one step into `buf` (count, series)."""

    start: int
    count: int
    buf: list | dict  # a readout's [(columns, Batch, first row, end row)]; a capture's {layer: (count, d_model) copy}
    seen: set = field(default_factory=set)  # (layer, before) the op filled (a forward that did not run fills none)


@dataclass(eq=False)
class Batch:
    """What one layer reads in one step, before or after its edits, for the requests that share a ProbeSet (a
    capture: for one request)."""

    key: tuple[int, bool]  # (layer, before): which tensor of the op its rows come from
    rows: list[int]  # flattened token indices of the step, request after request
    members: list = field(default_factory=list)  # (SeriesReader, Piece, its first row here, its end row)
    idx: torch.Tensor | None = None  # the rows on the device
    vals: torch.Tensor | None = None  # (rows, n) a readout's values, set by the op


@dataclass
class SeriesReader:
    req: ReadoutRequest | CaptureRequest
    groups: dict  # (layer, before) -> ProbeGroup of the probes this worker holds; a capture: (layer, before) -> None
    prompt_len: int
    upto: int = 0  # positions below this have been planned
    pieces: list[Piece] = field(default_factory=list)


class SeriesReadout:
    key = XREAD

    def _parse(self, given: dict) -> ReadoutRequest:
        return ReadoutRequest.from_dict(given)

    def _groups(self, req) -> dict:
        return self.sets.groups(req.probes)

    def _first(self, m: SeriesReader) -> int:
        """The first position the request reads."""
        return 0 if m.req.prompt else m.prompt_len - 1

    def _buffer(self, m: SeriesReader, count: int):
        return []  # (its columns, the Batch, first row, end row) per layer: its values stay in the batch's tensor

    def _batch_key(self, key: tuple[int, bool], m: SeriesReader):
        return id(m.groups[key].pset)  # requests reading the same series: one `values` call for all

    def _fill(self, batch: Batch, x: torch.Tensor) -> None:
        """x (rows, d_model): the batch's rows of the stream."""
        batch.vals = batch.members[0][0].groups[batch.key].pset.values(x)  # (rows, n)
        for m, piece, a, b in batch.members:  # host-side notes only: no tensor op per request
            piece.buf.append((m.groups[batch.key].cols, batch, a, b))

    def __init__(self, saes: dict, layers, device):
        self.saes, self.layers, self.device = saes, set(layers), device  # SAEs and every steering layer held here
        self.sets = ProbeSets(saes, device)  # requests reading the same series share their tensors
        self.meta: dict[str, SeriesReader] = {}  # running requests with a readout, by vLLM request id
        self.tag_of: dict[str, str] = {}
        self.by_tag: dict[str, SeriesReader] = {}
        self.done: OrderedDict[str, SeriesReader] = OrderedDict()
        self.plan: dict[int, list[Batch]] | None = None  # layer -> what it reads this step

    def add_request(self, req_id: str, prompt_len: int, extra: dict | None, tag: str) -> None:
        given = (extra or {}).get(self.key)
        if given is None:
            return
        try:
            req = self._parse(given)
        except (ValueError, TypeError, KeyError) as e:
            log.error("request %s: its %s cannot be read: %s", req_id, self.key, e)
            return
        groups = {k: g for k, g in self._groups(req).items() if k[0] in self.layers}
        if not groups:
            return
        r = SeriesReader(req, groups, prompt_len)
        self.meta[req_id] = self.by_tag[tag] = r
        self.tag_of[req_id] = tag
        self.done.pop(tag, None)

    def finish(self, req_ids) -> None:
        for rid in req_ids:
            r = self.meta.pop(rid, None)
            if r is None:
                continue
            tag = self.tag_of.pop(rid)
            if self.by_tag.get(tag) is r:
                del self.by_tag[tag]
                self.done[tag] = r
                while len(self.done) > KEEP_DONE:
                    self.done.popitem(last=False)

    def prepare(self, rows: list[str], starts, qsl) -> None:
        """Plan the next forward, as `FeatureReadout.prepare` (row r owns tokens [qsl[r], qsl[r + 1]) and starts at
        position starts[r])."""
        self.plan = None
        if not self.meta:
            return
        batches: dict[tuple, Batch] = {}
        for r, rid in enumerate(rows):
            m = self.meta.get(rid)
            if m is None:
                continue
            start, first, last = int(starts[r]), int(qsl[r]), int(qsl[r + 1])
            lo = max(start, m.upto, self._first(m))
            hi = start + (last - first)
            if lo >= hi:
                continue
            piece = Piece(lo, hi - lo, self._buffer(m, hi - lo))
            m.pieces.append(piece)
            m.upto = hi
            for key in m.groups:
                b = batches.setdefault((key, self._batch_key(key, m)), Batch(key, []))
                b.members.append((m, piece, len(b.rows), len(b.rows) + hi - lo))
                b.rows.extend(range(first + lo - start, first + hi - start))
        plan: dict[int, list[Batch]] = {}
        for b in batches.values():
            b.idx = torch.tensor(b.rows, dtype=torch.long).to(self.device)
            plan.setdefault(b.key[0], []).append(b)
        self.plan = plan or None

    def observe(self, layer: int, pre: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """pre, hidden: the steering op's input and output at `layer` (before and after this layer's edits), each
        (..., d_model) and, with `residual`, summing to the stream."""
        d = hidden.shape[-1]
        for batch in self.plan.get(layer, ()):
            x = (pre if batch.key[1] else hidden).reshape(-1, d)[batch.idx]  # (rows, d_model)
            if residual is not None:
                x = x + residual.reshape(-1, d)[batch.idx]
            self._fill(batch, x)
            for _, piece, _, _ in batch.members:
                piece.seen.add(batch.key)

    def end_step(self) -> None:
        self.plan = None

    def take(self, tag: str) -> dict | None:
        """A request's values once it has finished: {"positions", "values": [[series...] per position], "columns":
        the series this worker read}; None if it knows no such request. Forgets it."""
        r = self.done.pop(tag, None) or self.by_tag.get(tag)
        if r is None:
            return None
        full = [p for p in r.pieces if p.seen >= set(r.groups)]  # a planned forward that did not run left no values
        positions = [p.start + j for p in full for j in range(p.count)]
        out = torch.zeros(len(positions), len(r.req.probes))  # (positions, series)
        chunks: dict[tuple, list] = {}
        for p in full:
            for cols, batch, a, b in p.buf:
                chunks.setdefault(tuple(cols), []).append(batch.vals[a:b])
        for cols, got in chunks.items():  # one cat and one column write per group of series
            out[:, list(cols)] = torch.cat(got).float().cpu()
        values = out.tolist()
        cols = sorted(c for g in r.groups.values() for c in g.cols)
        r.pieces = []
        return {"positions": positions, "values": values, "columns": cols}

    def peek(self, asks: dict[str, list]) -> dict[str, dict]:
        """One series of running requests, without forgetting it: {tag: [column, since]} -> {tag: {"positions",
        "values"}} for the positions from `since` on that every layer has read (a `stop_when`'s series, read per
        delta: the pieces are scanned from the newest back). A tag this worker does not read that column for is
        left out."""
        out = {}
        for tag, (col, since) in asks.items():
            r = self.by_tag.get(tag) or self.done.get(tag)
            keys = [k for k, g in (r.groups.items() if r else ()) if col in g.cols]  # its (layer, before)
            if not keys:
                continue
            fresh = []
            for p in reversed(r.pieces):
                if p.start + p.count <= since:
                    break
                fresh.append(p)
            positions, values = [], []
            for p in reversed(fresh):
                if keys[0] not in p.seen:  # a planned forward that did not run (as `take`): a gap the caller sees
                    continue
                cols, batch, a, b = next(e for e in p.buf if col in e[0])
                first = max(since - p.start, 0)
                positions += range(p.start + first, p.start + p.count)
                values += batch.vals[a + first : b, list(cols).index(col)].float().cpu().tolist()
            out[tag] = {"positions": positions, "values": values}
        return out

    def drop(self, tag: str) -> None:
        self.done.pop(tag, None)
        r = self.by_tag.get(tag)
        if r is not None:
            r.pieces = []


class CaptureCopy(SeriesReadout):
    """A request's `capture` on the worker: copies of its rows at each captured layer held here, after its edits there
    or before them."""

    key = XCAPTURE

    def _parse(self, given: dict) -> CaptureRequest:
        return CaptureRequest.from_dict(given)

    def _groups(self, req) -> dict:
        return dict.fromkeys(((layer, req.edits == "before") for layer in req.layers), None)

    def _first(self, m: SeriesReader) -> int:
        return 0

    def _buffer(self, m: SeriesReader, count: int):
        return {}

    def _batch_key(self, key: tuple[int, bool], m: SeriesReader):
        return id(m)  # a batch of one request

    def _fill(self, batch: Batch, x: torch.Tensor) -> None:
        (m, piece, _, _) = batch.members[0]
        layer = batch.key[0]  # one capture reads each layer once (all before, or all after)
        if m.req.positions == "last":  # only the latest row is ever returned: earlier pieces let go of theirs
            for p in m.pieces[:-1]:
                p.buf.clear()
                p.count = 0
            piece.buf[layer] = x[-1:].clone()
            piece.start, piece.count = piece.start + piece.count - 1, 1
        else:
            piece.buf[layer] = x.clone()

    def take(self, tag: str) -> dict | None:
        """A finished request's rows: {"positions", "rows": {layer: float32 bytes of its (positions, d_model) rows}}
        (bytes: `collective_rpc` carries plain data); None if this worker knows no such request. Forgets it."""
        r = self.done.pop(tag, None) or self.by_tag.get(tag)
        if r is None:
            return None
        layers = {layer for layer, _ in r.groups}
        full = [p for p in r.pieces if p.seen >= set(r.groups) and p.count]
        positions = [p.start + j for p in full for j in range(p.count)]
        rows = {L: torch.cat([p.buf[L] for p in full]).float().cpu().numpy().tobytes() if full else b"" for L in layers}
        r.pieces = []
        return {"positions": positions, "rows": rows}
