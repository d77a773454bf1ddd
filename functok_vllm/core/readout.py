"""Per-token readouts of chosen series: SAE feature activations and projections on unit directions, at one layer.

A request (or a server monitor) names the series it wants read at every position its forwards compute: a feature of
the SAE at a layer (its activation exactly as the SAE's `encode` computes it: `SAE.encode_features`, only that
feature's columns where the architecture allows, the full encode otherwise) or a unit direction there (the value is
the projection `h . u`). The engines group a request's series by (layer, before-or-after its edits) into one
`ProbeGroup` each and call `values` on the rows of the tensor at that layer's hook point: two matmuls over the rows
asked for, never a loop per token.
"""

from __future__ import annotations

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


@dataclass
class ProbeGroup:
    """The series of one request read at one layer at one moment (before or after its edits there)."""

    cols: torch.Tensor  # (n,) the request's series this group fills, features first, then directions
    features: torch.Tensor | None  # (nf,) SAE feature ids, on the device
    U: torch.Tensor | None  # (d_model, nv) unit directions, on the device

    @torch.no_grad()
    def values(self, sae: SAE | None, h: torch.Tensor) -> torch.Tensor:
        """h (rows, d_model) -> (rows, n) values, in float32."""
        parts = []
        if self.features is not None:
            parts.append(sae.encode_features(h.to(sae.W_dec.dtype), self.features).float())  # (rows, nf)
        if self.U is not None:
            parts.append(h.float() @ self.U)  # (rows, nv)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def probe_groups(probes: tuple[Probe, ...], device) -> dict[tuple[int, bool], ProbeGroup]:
    """{(layer, before): ProbeGroup} of a request's probes, each column index its position in `probes`."""
    at: dict[tuple[int, bool], tuple[list, list]] = {}
    for i, p in enumerate(probes):
        feats, dirs = at.setdefault((p.layer, p.before), ([], []))
        (feats if p.feature is not None else dirs).append(i)
    out = {}
    for key, (feats, dirs) in at.items():
        f = torch.tensor([probes[i].feature for i in feats], dtype=torch.long, device=device) if feats else None
        u = None
        if dirs:
            u = torch.tensor([probes[i].direction for i in dirs], dtype=torch.float32, device=device).T.contiguous()
        out[key] = ProbeGroup(torch.tensor(feats + dirs, dtype=torch.long, device=device), f, u)
    return out
