"""Per-token readouts of chosen series: SAE feature activations and projections on unit directions, at one layer.

A request (or a server monitor) names the series it wants read at every position its forwards compute: a feature of
the SAE at a layer (its activation exactly as the SAE's `encode` computes it: `SAE.encode_features`, only that
feature's columns where the architecture allows, the full encode otherwise) or a unit direction there (the value is
the projection `h . u`). The engines group a request's series by (layer, before-or-after its edits) into one
`ProbeGroup` each, whose `ProbeSet` (shared by every request that reads the same series) computes `values` on the
rows of the tensor at that layer's hook point: two matmuls over the rows asked for, never a loop per token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from functok_vllm.core.sae import SAE


@dataclass(frozen=True)
class Probe:
    """One series: SAE feature `feature` at `layer`, or the projection on the unit `direction` (d_model,) there."""

    layer: int
    feature: int | None = None
    direction: tuple[float, ...] | None = None  # unit length; a vector's direction at `layer`
    before: bool = False  # read the stream before this request's edits at `layer` (the edits upstream applied)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "feature": self.feature, "direction": self.direction, "before": self.before}

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        direction = None if d.get("direction") is None else tuple(float(x) for x in d["direction"])
        feature = None if d.get("feature") is None else int(d["feature"])
        return cls(int(d["layer"]), feature, direction, bool(d.get("before", False)))


class ProbeSet:
    """Features of one SAE and unit directions read together at one layer: their encoder columns and directions
    stacked once, on the device. Requests that read the same series share one (`ProbeSets`), so a forward computes
    it once over all their rows."""

    def __init__(self, sae: SAE | None, features: list[int], directions: list[tuple[float, ...]], device):
        self.encode = None
        if features:
            ids = torch.tensor(features, dtype=torch.long, device=device)  # (nf,)
            self.encode = sae.column_encoder(ids)  # (rows, d_in) -> (rows, nf)
        self.U = torch.tensor(directions, dtype=torch.float32, device=device).T.contiguous() if directions else None
        self.dtype = sae.W_dec.dtype if sae is not None else torch.float32

    @torch.no_grad()
    def values(self, h: torch.Tensor) -> torch.Tensor:
        """h (rows, d_model) -> (rows, n) values in float32: the features' activations, then the projections."""
        parts = []
        if self.encode is not None:
            parts.append(self.encode(h.to(self.dtype)).float())  # (rows, nf)
        if self.U is not None:
            parts.append(h.float() @ self.U)  # (rows, nv)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class ProbeGroup:
    """The series of one request read at one layer at one moment (before or after its edits there)."""

    cols: list[int]  # the request's series this group fills, in the order of `pset`'s values
    pset: ProbeSet


class ProbeSets:
    """Interns ProbeSets by what they read, so that requests asking for the same series (the server's monitors, a
    dashboard's readout) share one; at most `size` kept, least recently used dropped."""

    def __init__(self, saes: dict, device, size: int = 256):
        self.saes, self.device, self.size = saes, device, size  # {layer: SAE}
        self.sets: OrderedDict = OrderedDict()

    def groups(self, probes: tuple[Probe, ...]) -> dict[tuple[int, bool], ProbeGroup]:
        """{(layer, before): ProbeGroup} of a request's probes, each column index its position in `probes`."""
        at: dict[tuple[int, bool], tuple[list, list]] = {}
        for i, p in enumerate(probes):
            feats, dirs = at.setdefault((p.layer, p.before), ([], []))
            (feats if p.feature is not None else dirs).append(i)
        out = {}
        for (layer, before), (feats, dirs) in at.items():
            f = [probes[i].feature for i in feats]
            d = [probes[i].direction for i in dirs]
            key = (layer, tuple(f), tuple(d))
            pset = self.sets.pop(key, None) or ProbeSet(self.saes.get(layer), f, d, self.device)
            self.sets[key] = pset
            while len(self.sets) > self.size:
                self.sets.popitem(last=False)
            out[(layer, before)] = ProbeGroup(feats + dirs, pset)
        return out
