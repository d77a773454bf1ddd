"""The `readout` object of a generation request: chosen SAE features and vectors read at every position, and pooled.

    "readout": {"features": [{"layer": 2, "feature": 1493}], "vectors": ["calm"], "pool": ["mean", "max", "last"],
                "prompt": false, "edits": "after"}

asks for the activation of each listed SAE feature (exactly as that SAE encodes the tensor at its hook point) and the
projection of the stream on each listed vector's unit direction at each of its steering layers, at every position the
request's forwards compute that predicts a generated token (the last prompt position, then each generated token fed
back), and with `prompt` every prompt position too; `edits` reads the stream after this request's edits at the layer
(the default) or before them. Pooled over those positions with each of `pool`. Both HTTP edges and both engines use
this module; a bad object is a SpecError naming the field (`readout.features[1].feature`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import Field

from functok_vllm.core.readout import Probe
from functok_vllm.core.spec import SpecError
from functok_vllm.steering import SteeringInfo, Strict, StrictInt
from functok_vllm.validation import shown, validated

POOLS = ("mean", "max", "last")
READOUT_EDITS = ("after", "before")
MAX_LISTED = 256  # features or vectors one object may list: bounds the checks' work (the server's limit is lower)


@dataclass(frozen=True)
class ReadoutRequest:
    probes: tuple[Probe, ...]  # one per series, in the response's order
    labels: tuple[dict, ...]  # what the response names each series by: {"layer", "feature"} or {"vector", "layer"}
    prompt: bool = False  # every prompt position too, not only those that predict generated tokens
    pool: tuple[str, ...] = POOLS

    def to_dict(self) -> dict:
        """The form an engine passes along (vLLM's `extra_args` carry plain data); labels stay with the server."""
        return {"probes": [p.to_dict() for p in self.probes], "prompt": self.prompt}

    @classmethod
    def from_dict(cls, d: dict) -> ReadoutRequest:
        probes = tuple(Probe.from_dict(p) for p in d["probes"])
        return cls(probes, tuple({} for _ in probes), bool(d.get("prompt", False)), ())

    def joined(self, other: ReadoutRequest | None) -> ReadoutRequest:
        """This request's series, then `other`'s (the server's monitors), read in one pass."""
        if other is None:
            return self
        return ReadoutRequest(self.probes + other.probes, self.labels + other.labels, self.prompt, self.pool)


class FeatureIn(Strict):
    layer: StrictInt
    feature: StrictInt


class ReadoutIn(Strict):
    features: list[FeatureIn] = Field(default_factory=list, max_length=MAX_LISTED)
    vectors: list[str] = Field(default_factory=list, max_length=MAX_LISTED)
    pool: list[str] = Field(default_factory=lambda: list(POOLS))
    prompt: bool = False
    edits: str = "after"


def parse_readout(
    given,
    info: SteeringInfo,
    lookup: Callable | None,
    max_series: int,
    param: str = "readout",
) -> ReadoutRequest | None:
    """A user's readout object -> ReadoutRequest checked against the loaded SAEs and the steering layers, vectors
    resolved by `lookup(name, None) -> Vector` (LookupError saying why not); None for None. SpecError naming the field
    when it is bad; `max_series` bounds the series (each vector counts once per layer it has)."""
    if given is None:
        return None
    r = validated(ReadoutIn, given, param)
    if not r.features and not r.vectors:
        raise SpecError(param, "name at least one feature or vector to read")
    for i, p in enumerate(r.pool):
        if p not in POOLS:
            raise SpecError(f"{param}.pool[{i}]", f"{shown(p)} is not one of {', '.join(POOLS)}")
    if r.edits not in READOUT_EDITS:
        raise SpecError(f"{param}.edits", f"{shown(r.edits)} is not one of {', '.join(READOUT_EDITS)}")
    before = r.edits == "before"
    probes, labels = [], []
    have = ", ".join(map(str, sorted(info.d_sae))) or "none"
    for i, f in enumerate(r.features):
        where = f"{param}.features[{i}]"
        if f.layer not in info.d_sae:
            raise SpecError(f"{where}.layer", f"no SAE is loaded at layer {f.layer} (layers with SAEs: {have})")
        if not 0 <= f.feature < info.d_sae[f.layer]:
            raise SpecError(f"{where}.feature", f"{f.feature} is outside [0, {info.d_sae[f.layer]})")
        probes.append(Probe(f.layer, f.feature, None, before))
        labels.append({"layer": f.layer, "feature": f.feature})
    for i, name in enumerate(r.vectors):
        where = f"{param}.vectors[{i}]"
        if lookup is None:
            raise SpecError(where, "this server has no steering library")
        try:
            at = lookup(name, None).at(info.hook_layers)
        except LookupError as e:  # KeyError too: hooks no steering layer has
            msg = e.args[0] if not isinstance(e, KeyError) else f"no steering layer at {e.args[0]}"
            raise SpecError(where, f"{name!r}: {msg}") from None
        for layer, d in sorted(at.items()):
            norm = float(d.double().norm())
            if norm == 0:
                raise SpecError(where, f"{name!r} is zero at layer {layer}: it has no direction to project on")
            unit = (d.double() / norm).float()  # (d_model,)
            probes.append(Probe(layer, None, tuple(unit.tolist()), before))
            labels.append({"vector": name, "layer": layer})
    if len(probes) > max_series:
        msg = f"{len(probes)} series (features + vectors x their layers); this server reads at most {max_series} a "
        raise SpecError(param, msg + "request (max_readouts)")
    return ReadoutRequest(tuple(probes), tuple(labels), r.prompt, tuple(dict.fromkeys(r.pool)))


def pooled(values: list[float], pools: tuple[str, ...]) -> dict[str, float | None]:
    """{pool: value} over one series' per-position values (None over no positions)."""
    out: dict[str, float | None] = {}
    for p in pools:
        if not values:
            out[p] = None
        elif p == "mean":
            out[p] = sum(values) / len(values)
        elif p == "max":
            out[p] = max(values)
        else:
            out[p] = values[-1]
    return out


def check_readout(req: ReadoutRequest, info: SteeringInfo, param: str = "readout") -> None:
    """SpecError unless every series can be read here: a feature of an SAE that is loaded, a direction of the model's
    width at a steering layer (what an engine checks of a request built by a Python caller, not the HTTP edge)."""
    layers = set(info.hook_layers.values()) | set(info.d_sae)
    for i, p in enumerate(req.probes):
        if p.feature is not None and not (p.layer in info.d_sae and 0 <= p.feature < info.d_sae[p.layer]):
            raise SpecError(f"{param}.probes[{i}]", f"no feature {p.feature} of an SAE at layer {p.layer}")
        if p.feature is None and (p.layer not in layers or p.direction is None or len(p.direction) != info.d_model):
            msg = f"needs a feature, or a direction of {info.d_model} numbers at a steering layer"
            raise SpecError(f"{param}.probes[{i}]", msg)
