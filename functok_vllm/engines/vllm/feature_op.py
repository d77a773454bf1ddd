"""SAE feature readout on a vLLM worker: the op in the model, which tokens of each step it reads, and the store.

vLLM's protocol carries tokens, text and logprobs from the workers to the API process, nothing per token besides, so
features travel on a side channel of our own:

1. The op `functok::read_features(pre, hidden, residual, marker, layer, key)` runs right after the steering op at
   each steering layer's hook point (`worker.steer_and_read`, in a hook placed before vLLM compiles), opaque to
   Dynamo/Inductor like the steer op (it declares that it mutates `marker`, a one-element buffer, so the compiler
   keeps it and orders it after its inputs exist). It is given both the steering op's input `pre` and its output
   `hidden` (with `residual`, the stream before and after this layer's edits: readouts and captures with
   `edits: "before"` read `pre`; features read `hidden`). At run time it finds the worker's `FeatureReadout` in
   vLLM's forward context (registered under `key` when the model was loaded; no module global), which does nothing
   unless the step has a plan.
2. `FeatureReadout.prepare` (before every forward, host-side only: no device sync) plans the step: for each running
   request that asked for `features`, the tokens of its rows whose positions it has not read yet (every prompt
   position with `prompt`, else from the last prompt position on). The op encodes only those rows with the core's
   `top_features` and keeps the (rows, k) results on the device.
3. The API process reads them with `collective_rpc("functok_features", args=({tag: [upto, prompt]},))`, per streamed
   delta or once at the end (`engine.py`); reading is the only host copy. A finished request's results wait, up to
   `KEEP_DONE` requests, until read.

A request without `features` costs one Python call of the op per SAE layer and forward (it returns at once).
On CUDA graphs the op's Python would not run on replay, so feature requests are refused there (`admission.py`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from functok_vllm.core.top_features import rows_to_lists, top_features
from functok_vllm.engines.vllm import compat
from functok_vllm.engines.vllm.series_op import CaptureCopy, SeriesReadout
from functok_vllm.feature_request import FeatureRequest

log = logging.getLogger("functok.vllm")
XFEAT = "functok_features"  # extra_args key: FeatureRequest.to_dict() (set by functok's VLLMEngine or a Python caller)
KEEP_DONE = 64  # finished requests whose unread features are kept (each holds its tensors)
READOUT_KEY = "functok.feature_readout"  # the worker's FeatureReadout in vLLM's forward context


@torch.library.custom_op("functok::read_features", mutates_args=("marker",))
def read_features(
    pre: torch.Tensor,
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    marker: torch.Tensor,
    layer: int,
    key: str,
) -> None:
    """Read out SAE features of `hidden + residual` (or `hidden`) at layer `layer` for the planned rows, into the
    `FeatureReadout` this forward carries under `key` (vLLM's forward context, `compat.forward_state`); readouts and
    captures read `hidden`, or `pre` (the steering op's input: this layer's edits not added) where they ask."""
    ro = compat.forward_state(key)
    if ro is not None and ro.plan is not None:
        ro.observe(layer, hidden, residual)
    if ro is not None and ro.series.plan is not None:  # a request's `readout` (`series_op.py`)
        ro.series.observe(layer, pre, hidden, residual)
    if ro is not None and ro.capture.plan is not None:  # a request's `capture` (`series_op.py`)
        ro.capture.observe(layer, pre, hidden, residual)


@read_features.register_fake
def _(pre, hidden, residual, marker, layer, key):
    return None


@dataclass
class StepPlan:
    rows: dict[int, list[int]] = field(default_factory=dict)  # layer -> flattened token indices of this forward
    k: dict[int, int] = field(default_factory=dict)  # layer -> largest top_k among its readers
    idx: dict[int, torch.Tensor] = field(default_factory=dict)  # the rows on the device
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (values, ids)


@dataclass
class Piece:
    """Consecutive positions [start, start + count) of one request, read in one step."""

    start: int
    count: int
    step: StepPlan
    offset: dict[int, int]  # layer -> its first row in step.out[layer]


@dataclass
class Reader:
    fr: FeatureRequest
    layers: tuple[int, ...]  # the requested layers this worker holds (all of them without pipeline parallel)
    prompt_len: int
    upto: int = 0  # positions below this have been read out
    pieces: list[Piece] = field(default_factory=list)
    sent_gen: int = 0  # generated tokens whose entries the API process has taken
    sent_prompt: bool = False


class FeatureReadout:
    def __init__(self, saes: dict, device, layers=()):
        self.saes, self.device = saes, device  # {layer: SAE} on the worker's device
        self.series = SeriesReadout(saes, set(layers) | set(saes), device)  # requests' `readout`: same op, same steps
        self.capture = CaptureCopy(saes, set(layers) | set(saes), device)  # requests' `capture`
        self.meta: dict[str, Reader] = {}  # running requests with features, by vLLM request id
        self.by_tag: dict[str, Reader] = {}
        self.tag_of: dict[str, str] = {}
        self.done: OrderedDict[str, Reader] = OrderedDict()
        self.plan: StepPlan | None = None

    def add_request(self, req_id: str, prompt_len: int, extra: dict | None, tag: str) -> None:
        self.series.add_request(req_id, prompt_len, extra, tag)
        self.capture.add_request(req_id, prompt_len, extra, tag)
        given = (extra or {}).get(XFEAT)
        if given is None:
            return
        try:
            fr = FeatureRequest.from_dict(given)
        except (ValueError, TypeError, KeyError) as e:
            log.error("request %s: features cannot be read out: %s", req_id, e)
            return
        layers = tuple(layer for layer in fr.layers if layer in self.saes)
        if not layers:
            return
        r = Reader(fr, layers, prompt_len)
        self.meta[req_id] = self.by_tag[tag] = r
        self.tag_of[req_id] = tag
        self.done.pop(tag, None)

    def finish(self, req_ids) -> None:
        self.series.finish(req_ids)
        self.capture.finish(req_ids)
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

    # ---- per step -------------------------------------------------------------------------------------------------

    def prepare(self, rows: list[str], starts, qsl) -> None:
        """Plan the next forward: `rows` its request ids in row order, `starts[r]` row r's first position, and
        `qsl` (host arrays) its token ranges (row r owns tokens [qsl[r], qsl[r + 1]))."""
        self.series.prepare(rows, starts, qsl)
        self.capture.prepare(rows, starts, qsl)
        self.plan = None
        if not self.meta:
            return
        step = StepPlan()
        for r, rid in enumerate(rows):
            m = self.meta.get(rid)
            if m is None:
                continue
            start, first, last = int(starts[r]), int(qsl[r]), int(qsl[r + 1])
            lo = max(start, m.upto, 0 if m.fr.prompt else m.prompt_len - 1)
            hi = start + (last - first)
            if lo >= hi:
                continue
            tok = list(range(first + lo - start, first + hi - start))
            offset = {}
            for layer in m.layers:
                offset[layer] = len(step.rows.setdefault(layer, []))
                step.rows[layer] += tok
                step.k[layer] = max(step.k.get(layer, 0), m.fr.top_k)
            m.pieces.append(Piece(lo, hi - lo, step, offset))
            m.upto = hi
        if step.rows:
            step.idx = {L: torch.tensor(t, dtype=torch.long).to(self.device) for L, t in step.rows.items()}
            self.plan = step

    def observe(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        idx = self.plan.idx.get(layer)
        if idx is None:
            return
        d = hidden.shape[-1]
        x = hidden.reshape(-1, d)[idx]
        if residual is not None:
            x = x + residual.reshape(-1, d)[idx]
        self.plan.out[layer] = top_features(self.saes[layer], x, self.plan.k[layer])

    def end_step(self) -> None:
        self.plan = None
        self.series.end_step()
        self.capture.end_step()

    # ---- reading (the API process, through the worker extension) --------------------------------------------------

    def take(self, asks: dict[str, list]) -> dict[str, dict]:
        """{tag: [upto, prompt]} -> {tag: {"prompt": [...], "generated": [...]}}: each entry {"L": [[feature,
        activation], ...]}; "generated" for generated tokens [sent, upto) (token j read at position
        prompt_len - 1 + j), "prompt" for every prompt position once when `prompt`. Tags it does not know are left
        out; a finished request is forgotten once its last entries are taken."""
        out = {}
        for tag, (upto, prompt) in asks.items():
            r = self.by_tag.get(tag) or self.done.get(tag)
            if r is None:
                continue
            got = {}
            if prompt and r.fr.prompt and not r.sent_prompt:
                got["prompt"] = self._entries(r, 0, r.prompt_len)
                r.sent_prompt = True
            base = r.prompt_len - 1
            got["generated"] = self._entries(r, base + r.sent_gen, base + upto)
            r.sent_gen += len(got["generated"])
            keep_from = base + r.sent_gen if (r.sent_prompt or not r.fr.prompt) else 0
            r.pieces = [p for p in r.pieces if p.start + p.count > keep_from]
            out[tag] = got
            if tag in self.done and r.sent_gen >= upto:
                del self.done[tag]
        return out

    def drop(self, tag: str) -> None:
        self.done.pop(tag, None)
        r = self.by_tag.get(tag)
        if r is not None:
            r.pieces = []

    def _entries(self, r: Reader, lo: int, hi: int) -> list[dict]:
        """Entries of positions [lo, hi) that were read out (stops at the first one that was not)."""
        spans = []  # (piece, first row in it, rows)
        at = lo
        for p in r.pieces:
            if any(layer not in p.step.out for layer in r.layers):  # a planned forward that did not run
                break
            if p.start <= at < p.start + p.count and at < hi:
                n = min(p.start + p.count, hi) - at
                spans.append((p, at - p.start, n))
                at += n
        if not spans:
            return []
        per_layer = {}
        for layer in r.layers:
            vals, ids = [], []
            for p, skip, n in spans:
                v, i = p.step.out[layer]
                a = p.offset[layer] + skip
                vals.append(v[a : a + n, : r.fr.top_k])
                ids.append(i[a : a + n, : r.fr.top_k])
            per_layer[str(layer)] = rows_to_lists(torch.cat(vals), torch.cat(ids))
        return [{L: per_layer[L][j] for L in per_layer} for j in range(at - lo)]
