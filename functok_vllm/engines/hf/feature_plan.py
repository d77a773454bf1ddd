"""What the transformers engine's hooks read at a steering layer: top-k features, chosen series, capture copies.

The batcher sets a plan before a forward in which some request asked for `features` (otherwise the plan is empty and
the hooks skip it: a dictionary lookup per SAE layer). The hook at each SAE layer hands the tensor at the hook point
AFTER this forward's steering there to `Readout.observe`, which encodes only the planned rows with the core's
`top_features`; after the forward, `entries` turns the results into each request's feature entries. A request's
`readout` series (`core.readout`) are read in the same hook, on its rows only, into a (rows, series) buffer per
forward (`read_series`); a capture copies its rows out (`keep_rows`). `layer_fn` is the hook of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from functok_vllm.core.readout import ProbeSet
from functok_vllm.core.top_features import rows_to_lists, top_features
from functok_vllm.feature_request import FeatureRequest


@dataclass
class LayerPlan:
    rows: torch.Tensor  # (m,) flattened token indices of the forward to read out
    k: int  # the largest top_k among the requests reading this layer
    result: tuple[torch.Tensor, torch.Tensor] | None = None  # (m, k) values and feature ids, set by the hook


class Readout:
    def __init__(self, device):
        self.device = device
        self.plans: dict[int, LayerPlan] = {}
        self.members: dict[int, list[int]] = {}  # layer -> request index (in the forward's order) of each plan row

    def observe(self, layer: int, sae, h: torch.Tensor) -> None:
        """Called by the hook at `layer` with the (tokens, d_in) tensor the SAE reads there, after steering."""
        plan = self.plans.get(layer)
        if plan is not None:
            plan.result = top_features(sae, h[plan.rows], plan.k)

    def plan(self, wants: list[tuple[int, FeatureRequest, list[int]]]) -> None:
        """wants: (request index, its FeatureRequest, flattened token indices to read for it) for this forward."""
        self.plans, self.members = {}, {}
        rows: dict[int, list[int]] = {}
        for i, fr, tokens in wants:
            for layer in fr.layers:
                rows.setdefault(layer, []).extend(tokens)
                self.members.setdefault(layer, []).extend([i] * len(tokens))
        for layer, r in rows.items():
            k = max(fr.top_k for i, fr, _ in wants if layer in fr.layers)
            self.plans[layer] = LayerPlan(torch.tensor(r, dtype=torch.long, device=self.device), k)

    def take(self) -> dict[int, list[dict]]:
        """After the forward: request index -> one {"L": [[feature, activation], ...]} per token it planned, in
        order (each list cut to the largest top_k; the batcher cuts it to the request's own). Clears the plan."""
        out: dict[int, list[dict]] = {}
        for layer, plan in self.plans.items():
            lists = rows_to_lists(*plan.result)
            seen: dict[int, int] = {}
            for i, row in zip(self.members[layer], lists, strict=True):
                j = seen.get(i, 0)
                seen[i] = j + 1
                per = out.setdefault(i, [])
                if j == len(per):
                    per.append({})
                per[j][str(layer)] = row
        self.plans, self.members = {}, {}
        return out


def entry(token_id: int, position: int, layers: dict, fr: FeatureRequest) -> dict:
    """One API feature entry, each layer's list cut to the request's top_k, in the order the request listed."""
    return {
        "token_id": token_id,
        "position": position,
        "layers": {str(L): layers[str(L)][: fr.top_k] for L in fr.layers},
    }


def layer_fn(layer: int, op, add: bool, readout: Readout | None, keep: list | None = None, reads: list | None = None):
    """The `StreamFn` of one layer for one forward: the steering op (`SteeringLayer.steered_hidden`, the same op as
    vLLM's) when `add`, then the feature readout of the stream it leaves, when `readout`, the copies of the rows
    capturing requests asked for (`keep`: [(Seq, rows)]) and the series reading requests asked for (`reads`:
    [SeriesRead]), each before or after the edits as the request asked."""

    def stream(x, residual):
        return (x if residual is None else x + residual).reshape(-1, x.shape[-1])  # (tokens, d_model)

    def fn(_module, hidden, residual):
        before = [(s, r) for s, r in keep or () if s.req.capture.edits == "before"]
        pre = stream(hidden, residual) if before or reads else None
        if before:
            keep_rows(layer, pre, before)
        if reads:
            read_series(pre, reads, before=True)
        out = op.steered_hidden(hidden, residual) if add else None
        after = [(s, r) for s, r in keep or () if s.req.capture.edits == "after"]
        if readout is not None or after or reads:
            h = pre if out is None and pre is not None else stream(hidden if out is None else out, residual)
            if readout is not None:
                readout.observe(layer, op.sae, h)
            keep_rows(layer, h, after)
            if reads:
                read_series(h, reads, before=False)
        return out

    return fn


@dataclass(eq=False)
class SeriesRead:
    """One ProbeSet read at one layer and moment in one forward, for every request that reads it there."""

    pset: ProbeSet
    before: bool
    rows: list[int]  # flattened token indices of the forward, request after request
    idx: torch.Tensor | None = None  # the rows on the device
    vals: torch.Tensor | None = None  # (rows, n) set by the hook


def plan_series(wants: list, device) -> dict[int, list[SeriesRead]]:
    """This forward's series plan: layer -> its SeriesReads, from (request, its first flattened row, the positions of
    its rows) of the requests that read series; each request notes (positions, [(its columns, read, first row, end
    row)]) in its `read_out`. Host-side list work per request; the hooks do one gather and `values` per read."""
    reads: dict = {}
    for seq, first, positions in wants:
        k, parts = len(positions), []
        for key, g in seq.groups.items():
            r = reads.get((key, id(g.pset)))
            if r is None:
                r = reads[(key, id(g.pset))] = SeriesRead(g.pset, key[1], [])
            parts.append((g.cols, r, len(r.rows), len(r.rows) + k))
            r.rows.extend(range(first, first + k))
        seq.read_out.append((positions, parts))
    out: dict[int, list[SeriesRead]] = {}
    for ((layer, _), _), r in reads.items():
        r.idx = torch.tensor(r.rows, dtype=torch.long, device=device)
        out.setdefault(layer, []).append(r)
    return out


def read_series(h: torch.Tensor, reads: list[SeriesRead], before: bool) -> None:
    """The planned reads of this layer at this moment, from h (tokens, d_model)."""
    for r in reads:
        if r.before == before:
            r.vals = r.pset.values(h[r.idx])


def series_values(read_out: list, n: int) -> tuple[list[int], torch.Tensor]:
    """A finished request's (positions, (positions, n) values) from the reads its forwards noted: one `cat` and one
    column write per group of series."""
    positions = [p for ps, _ in read_out for p in ps]
    out = torch.zeros(len(positions), n)
    chunks: dict[tuple, list] = {}
    for _, parts in read_out:
        for cols, r, a, b in parts:
            chunks.setdefault(tuple(cols), []).append(r.vals[a:b])
    for cols, got in chunks.items():
        out[:, list(cols)] = torch.cat(got).cpu()
    return positions, out


def latest_value(read_out: list, series: int) -> float:
    """The value of series column `series` at the last row of the request's latest forward (one host read)."""
    _, parts = read_out[-1]
    for cols, r, _, b in parts:
        if series in cols:
            return float(r.vals[b - 1, list(cols).index(series)])
    raise ValueError(f"series {series} was not read in the latest forward")


def keep_rows(layer: int, h: torch.Tensor, keep: list) -> None:
    """Copy each capturing request's rows of h (tokens, d_model) into its `captured` list."""
    for seq, rows in keep:
        if seq.req.capture.positions == "last":  # only the latest row is ever returned
            seq.captured[layer] = [h[rows][-1:].clone()]
        else:
            seq.captured.setdefault(layer, []).append(h[rows].clone())
