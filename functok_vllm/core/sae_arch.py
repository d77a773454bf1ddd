"""SAE architectures, one class each (SAELens's registry): encoder tensors, activation, "active" test, clamp columns.

Every architecture encodes `sae_in` (the input after normalisation and the `b_dec` subtraction, see `SAE.sae_in`)
exactly as SAELens 6 does. For steering, a clamp needs one feature's activation on its own; an architecture gives it
as `ClampColumns`, which the batched steer op evaluates for every clamped feature at once:

    act = relu(sae_in @ w_mag + b_mag) * (sae_in @ w_gate + b_gate > threshold)

(standard: threshold 0, gate = magnitude; JumpReLU: its threshold; gated: its two paths). TopK activations depend on
every feature, so TopK says `clamp_exact = False` and clamps on it are refused when a request is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class ClampColumns:
    """One feature's encoder, as the steer op reads it. `w_mag`/`b_mag` None: the magnitude path is the gate's."""

    w_gate: torch.Tensor  # (d_in,)
    b_gate: float
    threshold: float
    w_mag: torch.Tensor | None = None  # (d_in,)
    b_mag: float | None = None


class Architecture:
    """Base: the tensors an SAE of this kind holds beside W_dec and b_dec, and its encoder."""

    name: ClassVar[str]
    clamp_exact: ClassVar[bool] = True  # can one feature's activation be computed without the others?
    magnitude_path: ClassVar[bool] = False  # a magnitude encoder apart from the gate (ClampColumns.w_mag)?

    def shapes(self, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,)}

    def prepare(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors derived once at load time (kept out of the per-token path)."""
        return {}

    def pre(self, sae, sae_in: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in) -> (tokens, d_sae) pre-activations, `sae_in @ W_enc + b_enc` as SAELens writes it (the bias
        added in place: the same sums, one (tokens, d_sae) tensor at a time)."""
        return (sae_in @ sae.W_enc).add_(sae.b_enc)

    def encode(self, sae, sae_in: torch.Tensor) -> torch.Tensor:
        return self.pre(sae, sae_in).relu()

    def active(self, sae, sae_in: torch.Tensor) -> torch.Tensor:
        """(tokens, d_sae) bool, exactly `encode(sae_in) > 0`, without forming activations where it can."""
        return self.pre(sae, sae_in) > 0

    def clamp_columns(self, sae, feature: int) -> ClampColumns:
        return ClampColumns(sae.W_enc[:, feature], float(sae.b_enc[feature]), 0.0)


class Standard(Architecture):
    name = "standard"


class JumpReLU(Architecture):
    name = "jumprelu"

    def shapes(self, d_in, d_sae):
        return super().shapes(d_in, d_sae) | {"threshold": (d_sae,)}

    def encode(self, sae, sae_in):
        pre = self.pre(sae, sae_in)
        return pre.relu() * (pre > sae.threshold)

    def active(self, sae, sae_in):
        return self.pre(sae, sae_in) > sae.threshold.clamp(min=0)  # relu(pre) * (pre > t) > 0  <=>  pre > max(t, 0)

    def clamp_columns(self, sae, feature):
        return ClampColumns(sae.W_enc[:, feature], float(sae.b_enc[feature]), float(sae.threshold[feature]))


class TopK(Architecture):
    name = "topk"
    clamp_exact = False

    def encode(self, sae, sae_in):
        vals, idx = self.pre(sae, sae_in).topk(sae.cfg.k, dim=-1, sorted=False)
        return torch.zeros(*sae_in.shape[:-1], sae.d_sae, dtype=vals.dtype, device=vals.device).scatter_(
            -1, idx, vals.relu()
        )

    def active(self, sae, sae_in):
        vals, idx = self.pre(sae, sae_in).topk(sae.cfg.k, dim=-1, sorted=False)
        out = torch.zeros(*sae_in.shape[:-1], sae.d_sae, dtype=torch.bool, device=vals.device)
        return out.scatter_(-1, idx, vals > 0)

    def clamp_columns(self, sae, feature):
        raise ValueError("a TopK SAE has no per-feature activation to clamp")


class Gated(Architecture):
    """Gated SAE (Rajamanoharan et al. 2024): a gate path decides which features fire, a magnitude path (the same
    encoder rescaled by exp(r_mag)) how strongly."""

    name = "gated"
    magnitude_path = True

    def shapes(self, d_in, d_sae):
        return {"W_enc": (d_in, d_sae), "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)}

    def prepare(self, w):
        return {"W_mag": w["W_enc"] * w["r_mag"].exp()}  # (d_in, d_sae), as SAELens forms it on every encode

    def pre(self, sae, sae_in):
        return (sae_in @ sae.W_enc).add_(sae.b_gate)

    def encode(self, sae, sae_in):
        gate = self.pre(sae, sae_in) > 0
        return gate * (sae_in @ sae.W_mag + sae.b_mag).relu()

    def active(self, sae, sae_in):
        return (self.pre(sae, sae_in) > 0) & ((sae_in @ sae.W_mag).add_(sae.b_mag) > 0)

    def clamp_columns(self, sae, feature):
        return ClampColumns(
            sae.W_enc[:, feature], float(sae.b_gate[feature]), 0.0, sae.W_mag[:, feature], float(sae.b_mag[feature])
        )


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (Standard(), JumpReLU(), TopK(), Gated())}
