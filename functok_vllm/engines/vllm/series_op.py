"""Readouts of chosen series on a vLLM worker: which rows of each step a request's `readout` reads, and its values.

The series travel on the side channel of `features` (`feature_op.py`): the request carries its probes in
`extra_args["functok_readout"]` (`ReadoutRequest.to_dict`: feature ids and unit directions, plain data); the
feature readout op, which runs right after the steering op at every steering layer, hands the stream it leaves to
`SeriesReadout.observe` when the step has a plan. `prepare` (host-side, before each forward) plans, for each running
request that reads series, the tokens of its rows whose positions it has not read yet (every prompt position with
`prompt`, else from the last prompt position on: chunked prefill and a recomputation after preemption read each
position once); `observe` fills the request's (rows, series) buffer of the step with `ProbeGroup.values` over those
rows. The API process takes a request's values once, when it has finished (`collective_rpc("functok_readout")`).

Only after the edits: this op sits after the steering op, so `edits: "before"` is refused on this engine. A request
without `readout` costs a dictionary lookup per step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from functok_vllm.core.readout import probe_groups
from functok_vllm.readout_request import ReadoutRequest

log = logging.getLogger("functok.vllm")
XREAD = "functok_readout"  # extra_args key: ReadoutRequest.to_dict() (set by functok's VLLMEngine or a Python caller)
KEEP_DONE = 64  # finished requests whose values wait to be taken


@dataclass
class Piece:
    """Positions [start, start + count) of one request, read in one step into `buf` (count, series)."""

    start: int
    count: int
    buf: torch.Tensor
    idx: torch.Tensor  # (count,) the rows of the step's tokens, on the device
    seen: set = field(default_factory=set)  # layers whose op filled it (a forward that did not run fills none)


@dataclass
class SeriesReader:
    req: ReadoutRequest
    groups: dict  # (layer, False) -> ProbeGroup of the probes this worker holds
    prompt_len: int
    upto: int = 0  # positions below this have been planned
    pieces: list[Piece] = field(default_factory=list)


class SeriesReadout:
    def __init__(self, saes: dict, layers, device):
        self.saes, self.layers, self.device = saes, set(layers), device  # SAEs and every steering layer held here
        self.meta: dict[str, SeriesReader] = {}  # running requests with a readout, by vLLM request id
        self.tag_of: dict[str, str] = {}
        self.by_tag: dict[str, SeriesReader] = {}
        self.done: OrderedDict[str, SeriesReader] = OrderedDict()
        self.plan: dict[int, list[tuple[SeriesReader, Piece]]] | None = None  # layer -> what it reads this step

    def add_request(self, req_id: str, prompt_len: int, extra: dict | None, tag: str) -> None:
        given = (extra or {}).get(XREAD)
        if given is None:
            return
        try:
            req = ReadoutRequest.from_dict(given)
        except (ValueError, TypeError, KeyError) as e:
            log.error("request %s: its readout cannot be read: %s", req_id, e)
            return
        mine = tuple(p for p in req.probes if p.layer in self.layers and not p.before)
        if not mine:
            return
        groups = probe_groups(req.probes, self.device)
        groups = {k: g for k, g in groups.items() if k[0] in self.layers and not k[1]}
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
        plan: dict[int, list] = {}
        for r, rid in enumerate(rows):
            m = self.meta.get(rid)
            if m is None:
                continue
            start, first, last = int(starts[r]), int(qsl[r]), int(qsl[r + 1])
            lo = max(start, m.upto, 0 if m.req.prompt else m.prompt_len - 1)
            hi = start + (last - first)
            if lo >= hi:
                continue
            idx = torch.arange(first + lo - start, first + hi - start).to(self.device)
            piece = Piece(lo, hi - lo, torch.zeros(hi - lo, len(m.req.probes), device=self.device), idx)
            m.pieces.append(piece)
            m.upto = hi
            for layer in {layer for layer, _ in m.groups}:
                plan.setdefault(layer, []).append((m, piece))
        self.plan = plan or None

    def observe(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        for m, piece in self.plan.get(layer, ()):
            d = hidden.shape[-1]
            x = hidden.reshape(-1, d)[piece.idx]  # (count, d_model)
            if residual is not None:
                x = x + residual.reshape(-1, d)[piece.idx]
            g = m.groups[(layer, False)]
            piece.buf[:, g.cols] = g.values(self.saes.get(layer), x)
            piece.seen.add(layer)

    def end_step(self) -> None:
        self.plan = None

    def take(self, tag: str) -> dict | None:
        """A request's values once it has finished: {"positions", "values": [[series...] per position], "columns":
        the series this worker read}; None if it knows no such request. Forgets it."""
        r = self.done.pop(tag, None) or self.by_tag.get(tag)
        if r is None:
            return None
        layers = {layer for layer, _ in r.groups}
        full = [p for p in r.pieces if p.seen >= layers]  # a planned forward that did not run left no values
        positions = [p.start + j for p in full for j in range(p.count)]
        values = torch.cat([p.buf for p in full]).tolist() if full else []
        cols = sorted(int(c) for g in r.groups.values() for c in g.cols.tolist())
        r.pieces = []
        return {"positions": positions, "values": values, "columns": cols}

    def drop(self, tag: str) -> None:
        self.done.pop(tag, None)
        r = self.by_tag.get(tag)
        if r is not None:
            r.pieces = []
