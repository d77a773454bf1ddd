"""The `features` object of a generation request, in one place: parsed and checked against the loaded SAEs.

    "features": {"layers": [1, 2], "top_k": 8, "prompt": true}

asks for the `top_k` most active features of the SAE at each listed layer, read at every position the request's
forward passes compute (the tensor at that SAE's hook point, after this request's edits there). Both HTTP edges and
both engines use this module, as they use `steering.py` for steering objects; a bad object is a `SpecError` naming
the field (`features.layers[1]`), which each edge turns into its own 400.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from functok_vllm.core.spec import SpecError
from functok_vllm.steering import SteeringInfo, Strict, StrictInt
from functok_vllm.validation import validated

MAX_TOP_K = 64  # features per layer and position


@dataclass(frozen=True)
class FeatureRequest:
    layers: tuple[int, ...]  # SAE layers (the `layer` an edit names), in the order given
    top_k: int
    prompt: bool = False  # also every prompt position, not only the positions that predict generated tokens

    def to_dict(self) -> dict:
        """The form an engine passes along (vLLM's `extra_args` carry plain data)."""
        return {"layers": list(self.layers), "top_k": self.top_k, "prompt": self.prompt}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureRequest:
        return cls(tuple(int(x) for x in d["layers"]), int(d["top_k"]), bool(d.get("prompt", False)))

    def values(self, positions: int) -> int:
        """Activations returned for `positions` positions: what the `max_feature_values` limit counts."""
        return positions * len(self.layers) * self.top_k


class FeaturesIn(Strict):
    layers: list[StrictInt] = Field(min_length=1)
    top_k: StrictInt = 8
    prompt: bool = False


def parse_features(given, info: SteeringInfo, param: str = "features") -> FeatureRequest | None:
    """A user's features object -> FeatureRequest checked against the loaded SAEs; None for None.
    SpecError whose field starts with `param` when it is bad."""
    if given is None:
        return None
    f = validated(FeaturesIn, given, param)
    req = FeatureRequest(tuple(f.layers), f.top_k, f.prompt)
    check_features(req, info, param)
    return req


def check_features(req: FeatureRequest, info: SteeringInfo, param: str = "features") -> None:
    """SpecError unless every layer has an SAE (each listed once) and 1 <= top_k <= min(MAX_TOP_K, its width)."""
    have = ", ".join(map(str, sorted(info.d_sae))) or "none"
    for i, layer in enumerate(req.layers):
        if layer not in info.d_sae:
            raise SpecError(f"{param}.layers[{i}]", f"no SAE is loaded at layer {layer} (layers with SAEs: {have})")
        if layer in req.layers[:i]:
            raise SpecError(f"{param}.layers[{i}]", f"layer {layer} is listed twice")
    widest = min(info.d_sae[layer] for layer in req.layers)
    if not 1 <= req.top_k <= min(MAX_TOP_K, widest):
        raise SpecError(f"{param}.top_k", f"{req.top_k} must be between 1 and {min(MAX_TOP_K, widest)}")
