"""Sparse autoencoders in SAELens's on-disk format: load, save, encode, decode, one-feature encode.

A directory holds `cfg.json` + `sae_weights.safetensors` with tensors `W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
`W_dec [d_sae, d_in]`, `b_dec [d_in]` and, for JumpReLU, `threshold [d_sae]`. This module reads and writes that
format itself (torch + safetensors only) so the server never imports sae_lens; the tests check that
`sae_lens.SAE.load_from_disk` loads what we write and encodes identically.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ARCHITECTURES = ("standard", "jumprelu", "topk")
# metadata.sae_lens_version marks the cfg.json layout: without a version >= 6, SAELens reads the file as a 5.x
# flat config and drops the nested metadata (hook_name included).
SAELENS_LAYOUT_VERSION = "6.0.0"


class SAELoadError(ValueError):
    """An SAE directory that is missing, corrupt, or does not fit the model it is attached to."""


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str = "jumprelu"
    hook_name: str = ""  # SAELens metadata.hook_name, e.g. "blocks.2.hook_resid_post"
    layer: int = -1  # decoder layer whose output (the residual stream) the SAE reads; -1 = parse hook_name
    apply_b_dec_to_input: bool = True  # SAELens subtracts b_dec from the input before encoding when True
    k: int = 0  # only for topk
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)  # other cfg.json keys, written back unchanged

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SAELoadError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAELoadError(f"d_in and d_sae must be positive, got d_in={self.d_in} d_sae={self.d_sae}")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise SAELoadError(f"topk SAE needs 0 < k <= d_sae, got k={self.k}")
        if self.layer < 0:
            self.layer = layer_from_hook_name(self.hook_name)


# Hook names of the residual stream between blocks, the one place functok reads and steers (group 1: the block).
RESIDUAL_HOOKS = (
    re.compile(r"blocks\.(\d+)\.hook_resid_(?:post|pre)"),  # TransformerLens / SAELens
    re.compile(r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)"),  # Hugging Face: a decoder layer's output
)


def layer_from_hook_name(hook_name: str) -> int:
    """`blocks.9.hook_resid_post` -> 9 (TransformerLens names), `model.layers.9` -> 9; -1 when absent.

    `blocks.9.hook_resid_pre` is the residual stream entering block 9, i.e. the output of decoder layer 8; the
    embeddings (`blocks.0.hook_resid_pre`) are no decoder layer's output and give -1. Any other hook point (the MLP
    or attention output, `hook_resid_mid`, `attn.hook_z`, a transcoder's input) reads another tensor than the one
    functok steers, and is refused with SAELoadError naming it rather than applied in the wrong place.
    """
    if not hook_name:
        return -1
    for pattern in RESIDUAL_HOOKS:
        m = pattern.fullmatch(hook_name)
        if m:
            block = int(m.group(1))
            return block - 1 if hook_name.endswith("hook_resid_pre") else block
    raise SAELoadError(
        f"hook point {hook_name!r} is not supported: functok reads and steers the residual stream between blocks "
        "(blocks.L.hook_resid_post, blocks.L.hook_resid_pre, model.layers.L), and an SAE at this hook reads another "
        "tensor"
    )


class SAE:
    """Weights of one SAE plus the three operations the steering core needs."""

    def __init__(self, cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None):
        self.cfg = cfg
        self.W_enc = W_enc  # (d_in, d_sae)
        self.b_enc = b_enc  # (d_sae,)
        self.W_dec = W_dec  # (d_sae, d_in)
        self.b_dec = b_dec  # (d_in,)
        self.threshold = threshold  # (d_sae,) for jumprelu, else None

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def layer(self) -> int:
        return self.cfg.layer

    def to(self, device=None, dtype=None) -> SAE:
        conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return SAE(self.cfg, *(conv(t) for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold)))

    def _sae_in(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in) -> (tokens, d_sae) feature activations, as SAELens computes them (the bias add is fused)."""
        return self.activation(self.pre(x))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in) -> (tokens, d_sae) encoder pre-activations, one fused matmul + bias (addmm)."""
        return torch.addmm(self.b_enc, self._sae_in(x), self.W_enc)

    def active(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in) -> (tokens, d_sae) bool, exactly `encode(x) > 0` without forming the activations: capture
        mode needs only which features fire. relu(pre) * (pre > t) > 0 holds iff pre > max(t, 0)."""
        pre = self.pre(x)
        if self.cfg.architecture == "jumprelu":
            return pre > self.threshold.clamp(min=0)
        if self.cfg.architecture == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, vals > 0)
        return pre > 0

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        if self.cfg.architecture == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        return pre.relu()

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """(tokens, d_sae) -> (tokens, d_in)."""
        return acts @ self.W_dec + self.b_dec

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Activations of only the given features: (tokens, d_in), (n,) -> (tokens, n). Never a full encode.

        Exact for standard and JumpReLU SAEs. TopK activations depend on every feature, so callers refuse clamp on
        topk SAEs at validation time rather than get an approximation.
        """
        pre = self._sae_in(x) @ self.W_enc[:, features] + self.b_enc[features]  # (tokens, n)
        if self.cfg.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold[features])
        return pre.relu()

    # ---- disk format ---------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=torch.float32) -> SAE:
        path = Path(path)
        cfg_path, w_path = path / "cfg.json", path / "sae_weights.safetensors"
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise SAELoadError(f"{p}: missing (an SAELens directory holds cfg.json and sae_weights.safetensors)")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise SAELoadError(f"{cfg_path}: not valid JSON ({e})") from None
        cfg = config_from_json(raw, cfg_path)
        try:
            w = load_file(str(w_path), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise SAELoadError(f"{w_path}: cannot be read as safetensors ({e})") from None
        want = {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }
        if cfg.architecture == "jumprelu":
            want["threshold"] = (cfg.d_sae,)
        for name, shape in want.items():
            if name not in w:
                raise SAELoadError(f"{w_path}: tensor {name} is missing")
            if tuple(w[name].shape) != shape:
                raise SAELoadError(f"{w_path}: {name} has shape {tuple(w[name].shape)}, cfg.json implies {shape}")
            if not torch.isfinite(w[name].float()).all():
                raise SAELoadError(f"{w_path}: {name} holds NaN or Inf")
        sae = cls(cfg, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], w.get("threshold"))
        return sae.to(device=device, dtype=dtype)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        save_file(
            {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()},
            str(path / "sae_weights.safetensors"),
        )
        (path / "cfg.json").write_text(json.dumps(config_to_json(self.cfg, dtype), indent=2) + "\n")


def config_from_json(raw: dict, where: Path | str = "cfg.json") -> SAEConfig:
    """Read a SAELens cfg.json (6.x layout, with the older flat `hook_name`/`activation_fn` keys accepted too)."""
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise SAELoadError(f"{where}: needs integer d_in and d_sae") from None
    arch = raw.get("architecture") or {"relu": "standard", "topk": "topk"}.get(
        raw.get("activation_fn", "relu"), "standard"
    )
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise SAELoadError(f"{where}: normalize_activations={raw['normalize_activations']!r} is not supported")
    meta = raw.get("metadata") or {}
    hook_name = meta.get("hook_name") or raw.get("hook_name") or ""
    known = {"d_in", "d_sae", "architecture", "apply_b_dec_to_input", "k", "dtype", "metadata", "hook_name"}
    extra = {k: v for k, v in raw.items() if k not in known}
    extra["metadata"] = meta
    try:
        cfg = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            architecture=arch,
            hook_name=hook_name,
            k=int(raw.get("k") or 0),
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            extra=extra,
        )
    except SAELoadError as e:
        raise SAELoadError(f"{where}: {e}") from None
    if cfg.layer < 0:
        raise SAELoadError(f"{where}: metadata.hook_name {hook_name!r} names no decoder layer's output")
    return cfg


def config_to_json(cfg: SAEConfig, dtype: torch.dtype) -> dict:
    out = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    out.update({k: v for k, v in cfg.extra.items() if k != "metadata"})
    out["metadata"] = {"sae_lens_version": SAELENS_LAYOUT_VERSION, **cfg.extra.get("metadata", {})}
    out["metadata"]["hook_name"] = cfg.hook_name
    if cfg.architecture == "topk":
        out["k"] = cfg.k
    out["architecture"] = cfg.architecture
    return out


def fraction_variance_explained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - SSE / total variance, over (tokens, d_in)."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1 - resid / total) if total > 0 else math.nan
