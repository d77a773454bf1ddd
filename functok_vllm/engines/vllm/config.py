"""The vLLM integration's settings (`additional_config["functok"]`) and the steering spec carried in `extra_args`.

    vllm serve MODEL --worker-extension-cls functok_vllm.engines.vllm.worker.SteeringWorkerExtension \\
        --additional-config '{"functok": {"saes": ["sae_weights/functok-tiny"], "function_tokens": "..."}}'

Keys (all optional; without them the shipped demo SAEs and function tokens are used):
  saes             SAE directories (cfg.json inside) or directories of them
  function_tokens  the function-token JSON written by `functok function-tokens` (default: MODEL/function_tokens.json
                   if the model directory has one, else the demo's when `saes` is not given either)
  max_edits        edits per request (default 16)
  max_clamps       clamp/ablate columns per layer shared by the running batch (default 64)

Everything here is torch-free apart from what the core imports, and reads SAE metadata from cfg.json only, so the API
process validates specs without loading weights. A request's spec travels as `extra_args["steering"]`: a JSON string
(what the OpenAI server's `vllm_xargs` allows) or, for offline `LLM` users, a dict; the API process rewrites it to the
canonical `SteeringSpec.key()` string, which the workers parse back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from functok_vllm.core.sae import SAELoadError, config_from_json
from functok_vllm.core.spec import SpecError, SteeringSpec
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_SAES

CONFIG_KEY = "functok"  # additional_config[CONFIG_KEY]
XARG = "steering"  # sampling_params.extra_args[XARG]
EXTENSION = "functok_vllm.engines.vllm.worker.SteeringWorkerExtension"
KNOWN = {"saes", "function_tokens", "max_edits", "max_clamps"}


@dataclass(frozen=True)
class SAEMeta:
    path: Path
    layer: int
    d_in: int
    d_sae: int
    architecture: str
    hook_name: str


@dataclass(frozen=True)
class FunctokConfig:
    saes: tuple[Path, ...]  # one directory per SAE, expanded
    function_tokens: Path
    max_edits: int = 16
    max_clamps: int = 64

    @property
    def sae_meta(self) -> dict[int, SAEMeta]:
        return _sae_meta(self.saes)

    @property
    def d_sae(self) -> dict[int, int]:
        return {layer: m.d_sae for layer, m in self.sae_meta.items()}

    @property
    def clamp_ok(self) -> dict[int, bool]:
        return {layer: m.architecture != "topk" for layer, m in self.sae_meta.items()}

    def check(self, spec: SteeringSpec) -> None:
        """SpecError unless every edit names a configured SAE layer, a feature inside it and a mode it supports."""
        spec.check(self.d_sae, self.max_edits, self.clamp_ok)


def cpu_defaults() -> None:
    """Without CUDA: VLLM_TARGET_DEVICE=cpu (our CPU build's version string does not say "cpu", so vLLM would not
    detect it) and a 1 GiB KV cache, unless already set. Call before vLLM resolves its platform (first engine)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def from_additional_config(additional_config, model: str | None = None) -> FunctokConfig:
    """The settings from `vllm_config.additional_config` (a dict, or anything else meaning "defaults") for `model`
    (vLLM's model name or directory)."""
    raw = additional_config.get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
    return _parse(json.dumps(raw, sort_keys=True), model)


@lru_cache(maxsize=8)
def _parse(raw_json: str, model: str | None) -> FunctokConfig:
    raw = json.loads(raw_json)
    if not isinstance(raw, dict) or set(raw) - KNOWN:
        unknown = sorted(set(raw) - KNOWN) if isinstance(raw, dict) else raw
        raise ValueError(f"additional_config.{CONFIG_KEY}: unknown keys {unknown}; known: {sorted(KNOWN)}")
    given = raw.get("saes", [str(DEMO_SAES)])
    if isinstance(given, str):
        given = [given]
    saes = tuple(_expand(Path(p)) for p in given)
    beside = Path(model) / "function_tokens.json" if model else None
    if "function_tokens" in raw:
        fn = Path(raw["function_tokens"])
    elif beside is not None and beside.is_file():
        fn = beside
    elif "saes" not in raw:
        fn = DEMO_FUNCTION_TOKENS
    else:
        raise ValueError(f"additional_config.{CONFIG_KEY}.function_tokens: required with `saes` for model {model!r}")
    if not fn.is_file():
        raise ValueError(f"additional_config.{CONFIG_KEY}.function_tokens: {fn} does not exist")
    limits = {k: raw[k] for k in ("max_edits", "max_clamps") if k in raw}
    for k, v in limits.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"additional_config.{CONFIG_KEY}.{k}: must be a positive integer, got {v!r}")
    cfg = FunctokConfig(tuple(p for group in saes for p in group), fn, **limits)
    cfg.sae_meta  # noqa: B018  (read every cfg.json now: a bad directory fails at startup)
    return cfg


def _expand(p: Path) -> list[Path]:
    if (p / "cfg.json").is_file():
        return [p]
    subs = sorted(q for q in p.iterdir() if (q / "cfg.json").is_file()) if p.is_dir() else []
    if not subs:
        raise ValueError(f"additional_config.{CONFIG_KEY}.saes: {p} is not an SAE directory nor a directory of them")
    return subs


@lru_cache(maxsize=8)
def _sae_meta(paths: tuple[Path, ...]) -> dict[int, SAEMeta]:
    out: dict[int, SAEMeta] = {}
    for p in paths:
        try:
            c = config_from_json(json.loads((p / "cfg.json").read_text()), p / "cfg.json")
        except (OSError, json.JSONDecodeError) as e:
            raise SAELoadError(f"{p / 'cfg.json'}: cannot be read ({e})") from None
        if c.layer in out:
            raise SAELoadError(f"{p}: a second SAE for layer {c.layer}")
        out[c.layer] = SAEMeta(p, c.layer, c.d_in, c.d_sae, c.architecture, c.hook_name)
    return dict(sorted(out.items()))


def to_xarg(spec: SteeringSpec) -> str:
    """A spec as a client sends it in `vllm_xargs.steering`: JSON with only the fields its edits' modes take."""
    need = {"add": "strength", "clamp": "value", "ablate": None}
    edits = [
        {"layer": e.layer, "feature": e.feature, "mode": e.mode}
        | ({need[e.mode]: getattr(e, need[e.mode])} if need[e.mode] else {})
        for e in spec.edits
    ]
    return json.dumps({"edits": edits, "positions": spec.positions})


def spec_from_xarg(value) -> SteeringSpec | None:
    """extra_args["steering"] (canonical JSON string or dict) -> SteeringSpec; None for no edits. SpecError if bad."""
    obj = json.loads(value) if isinstance(value, str) else value
    if not isinstance(obj, dict):
        raise SpecError(XARG, f"must be a JSON object, got {type(obj).__name__}")
    try:
        spec = SteeringSpec.from_dict(obj)
    except TypeError as e:
        raise SpecError(XARG, str(e)) from None
    return None if spec.is_noop else spec
