"""What an engine can steer (`SteeringInfo`: its SAEs, add-only layers, function tokens) and the limits every steering
object is held to (`SteeringLimits`): what `steering.parse_steering` checks a request against."""

from __future__ import annotations

from dataclasses import dataclass, field

from functok_vllm.core.hookpoint import HookPoint
from functok_vllm.core.spec import MAX_ABS_STRENGTH


def _limit(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class SteeringLimits:
    """Every limit on steering, for both engines and both servers (flags of `functok serve`, keys of vLLM's
    `additional_config["functok"]`)."""

    max_edits: int = _limit(16, "edits per request; more get 400")
    max_clamps: int = _limit(
        64,
        "clamp/ablate columns per layer shared by the running batch (at least max-edits); a request that does "
        "not fit waits",
    )
    max_projections: int = _limit(
        64,
        "project_out/cap/set columns per layer shared by the running batch (at least max-edits); a request that "
        "does not fit waits",
    )
    max_conditions: int = _limit(8, "edits with a 'when' condition per request; more get 400")
    max_condition_columns: int = _limit(
        32,
        "condition columns per layer shared by the running batch (one per conditional edit and layer where it acts; "
        "at least max-conditions; each is read at every token of every step); a request that does not fit waits",
    )
    max_abs_strength: float = _limit(1000.0, "largest |strength|, |value|, |min| and |max| of an edit; larger get 400")
    max_position_ids: int = _limit(
        256, "token ids in a position object's token_ids and in its exclude_ids (each); more get 400"
    )

    def __post_init__(self):
        for f in (
            "max_edits",
            "max_clamps",
            "max_projections",
            "max_conditions",
            "max_condition_columns",
            "max_position_ids",
        ):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a whole number of at least 1, got {v!r}")
        for f in ("max_clamps", "max_projections"):
            if getattr(self, f) < self.max_edits:
                raise ValueError(f"{f} ({getattr(self, f)}) must be at least max_edits ({self.max_edits})")
        if self.max_condition_columns < self.max_conditions:
            msg = f"max_condition_columns ({self.max_condition_columns}) must be at least max_conditions"
            raise ValueError(f"{msg} ({self.max_conditions})")
        s = self.max_abs_strength
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s <= MAX_ABS_STRENGTH:
            raise ValueError(f"max_abs_strength must be in (0, {MAX_ABS_STRENGTH:g}], got {s!r}")


@dataclass
class SteeringInfo:
    """What steering an engine can apply: an SAE per layer, add-only layers, and the function-token set."""

    d_sae: dict[int, int]  # layer -> SAE width
    clamp_ok: dict[int, bool]  # layer -> False where one feature's activation is not computable alone (TopK)
    sae: dict[int, dict]  # layer -> {"architecture", "hook_name", "site", "d_in", "normalize_activations"}
    function_token_ids: list[int]
    function_token_strings: list[str]
    add_layers: list[int] = field(default_factory=list)  # layers without an SAE where vectors go (resid_post)
    hook_layers: dict[str, int] = field(default_factory=dict)  # canonical hook name -> layer, every steering layer
    d_model: int | None = None
    sae_paths: dict[int, object] = field(default_factory=dict, repr=False)  # layer -> SAE directory (not shown)

    @classmethod
    def build(cls, configs: dict, function_tokens, add_layers=(), d_model: int | None = None) -> SteeringInfo:
        """From {layer: SAEConfig}, a FunctionTokens (or None), the add-only layers and the model's width."""
        ft = function_tokens
        hooks = {c.hook.canonical().name: layer for layer, c in configs.items()}
        hooks |= {HookPoint(layer, "resid_post").name: layer for layer in add_layers}
        d_model = d_model or next((c.d_in for c in configs.values()), None)
        return cls(
            d_sae={layer: c.d_sae for layer, c in configs.items()},
            clamp_ok={layer: c.arch.clamp_exact for layer, c in configs.items()},
            sae={
                layer: {
                    "architecture": c.architecture,
                    "hook_name": c.hook_name,
                    "site": c.site,
                    "d_in": c.d_in,
                    "normalize_activations": c.normalize_activations,
                }
                for layer, c in configs.items()
            },
            function_token_ids=list(ft.ids) if ft else [],
            function_token_strings=list(ft.strings) if ft else [],
            add_layers=sorted(add_layers),
            sae_paths={layer: c.path for layer, c in configs.items()},
            hook_layers=dict(sorted(hooks.items(), key=lambda kv: kv[1])),
            d_model=d_model,
        )

    def accepts_like(self, other: SteeringInfo) -> bool:
        """Does `other` accept exactly the specs this one accepts (same SAE widths, modes, layers and width)?"""
        same = (self.d_sae, self.clamp_ok, self.hook_layers, self.add_layers) == (
            other.d_sae,
            other.clamp_ok,
            other.hook_layers,
            other.add_layers,
        )
        return same and (self.d_model is None or other.d_model is None or self.d_model == other.d_model)

    def describe_layers(self) -> str:
        """The steerable layers in words, for error messages."""
        names = {layer: hook for hook, layer in self.hook_layers.items()}
        parts = [
            f"{layer} ({names[layer]}{', --steer-layers' if layer in self.add_layers else ''})"
            for layer in sorted(names)
        ]
        return "steerable layers: " + (", ".join(parts) or "none")
