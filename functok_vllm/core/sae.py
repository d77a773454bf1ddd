"""Sparse autoencoders in SAELens's on-disk format: the one loader, encode/decode as SAELens computes them, save.

A directory holds `cfg.json` + `sae_weights.safetensors`: `W_dec [d_sae, d_in]`, `b_dec [d_in]` and the encoder
tensors of its architecture (`sae_arch.py`: `W_enc`, `b_enc`, JumpReLU's `threshold`, gated's `b_gate`/`r_mag`/
`b_mag`). The SAE reads the tensor its `metadata.hook_name` names (`hookpoint.py`). Input normalisation as SAELens's
`normalize_activations`: `none`; `constant_norm_rescale` and `layer_norm` (per token, undone on the way out);
`expected_average_only_in` with its scaling factor, folded into the weights at load as SAELens's `from_pretrained`
does. This module reads and writes that format itself (torch + safetensors only), so the server never imports
sae_lens; tests check against `sae_lens.SAE.load_from_disk(...).encode` on SAEs that sae_lens itself saved.

`load_saes` is the one way any part of functok (engines, analysis, training tools) finds and loads SAE directories.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from functok_vllm.core.hookpoint import HookError, HookPoint, parse_hook_name
from functok_vllm.core.sae_arch import ARCHITECTURES, Architecture

# metadata.sae_lens_version marks the cfg.json layout: without a version >= 6, SAELens reads the file as a 5.x
# flat config and drops the nested metadata (hook_name included).
SAELENS_LAYOUT_VERSION = "6.0.0"
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")  # expected_average_only_in is folded at load
LAYER_NORM_EPS = 1e-5  # SAELens's run_time_activation_ln_in default


def normalize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens, d_in) -> (normalised x, out_scale, out_shift), SAELens's run_time_activation_norm_fn_in; its _out is
    y * out_scale + out_shift (None: identity). `kind` is one of NORMALIZATIONS."""
    if kind == "constant_norm_rescale":
        coeff = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True)  # (tokens, 1)
        return x * coeff, 1 / coeff, None
    if kind == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        std = centred.std(dim=-1, keepdim=True)  # (tokens, 1), unbiased like SAELens
        return centred / (std + LAYER_NORM_EPS), std, mu
    return x, None, None


class SAELoadError(ValueError):
    """An SAE directory that is missing, corrupt, unsupported, or does not fit the model it is attached to."""


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str = "jumprelu"
    hook_name: str = ""  # SAELens metadata.hook_name, e.g. "blocks.2.hook_resid_post"
    apply_b_dec_to_input: bool = True  # SAELens subtracts b_dec from the input before encoding when True
    normalize_activations: str = "none"  # one of NORMALIZATIONS, applied per token to the input
    k: int = 0  # only for topk
    # expected_average_only_in: the input scale SAELens folds into the weights (W_enc * s, W_dec / s, b_dec / s);
    # folded when the weights load, so saved weights are plain (normalize_activations "none").
    scaling_factor: float = 1.0
    extra: dict = field(default_factory=dict)  # other cfg.json keys, written back unchanged
    path: Path | None = None  # the directory it was read from (messages, fingerprints), never written
    hook: HookPoint = field(init=False)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SAELoadError(
                f"architecture {self.architecture!r} is not supported (one of {', '.join(ARCHITECTURES)})"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAELoadError(f"d_in and d_sae must be positive, got d_in={self.d_in} d_sae={self.d_sae}")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise SAELoadError(f"topk SAE needs 0 < k <= d_sae, got k={self.k}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAELoadError(f"normalize_activations={self.normalize_activations!r} is not supported")
        try:
            self.hook = parse_hook_name(self.hook_name)
        except HookError as e:
            raise SAELoadError(str(e)) from None

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @property
    def layer(self) -> int:
        """The block index of the hook point (`blocks.L...`), the `layer` a steering edit names."""
        return self.hook.layer

    @property
    def site(self) -> str:
        return self.hook.site


class SAE:
    """Weights of one SAE, with encode/decode as SAELens computes them and what steering reads of them."""

    threshold: torch.Tensor | None = None  # (d_sae,) JumpReLU only
    W_dec: torch.Tensor | None = None  # (d_sae, d_in); None when loaded encoder-only (`load(decoder=False)`)

    def __init__(self, cfg: SAEConfig, tensors: dict[str, torch.Tensor]):
        self.cfg = cfg
        # as stored: W_dec (d_sae, d_in), b_dec (d_in,) and the architecture's encoder tensors
        self.tensors = {k: v for k, v in tensors.items() if v is not None}
        for name, t in {**self.tensors, **cfg.arch.prepare(self.tensors)}.items():
            setattr(self, name, t)

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
        return SAE(self.cfg, {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()})

    # ---- the maths ----------------------------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return normalize(x, self.cfg.normalize_activations)

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in) -> what the encoder multiplies: normalised input minus b_dec (if apply_b_dec_to_input)."""
        x = self.normalize(x)[0]
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in) -> (tokens, d_sae) feature activations."""
        return self.cfg.arch.encode(self, self.sae_in(x))

    def active(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in) -> (tokens, d_sae) bool, exactly `encode(x) > 0` (capture mode needs only which fire)."""
        return self.cfg.arch.active(self, self.sae_in(x))

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in), (n,) -> (tokens, n) activations of those features; only their columns where exact."""
        return self.column_encoder(features)(x)

    def column_encoder(self, features: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """(n,) feature ids -> a function (tokens, d_in) -> (tokens, n) of their activations, `encode(x)[:, features]`
        computed from their encoder columns only (stacked once, here) where the architecture allows it, from the
        full encode otherwise (TopK)."""
        if not self.cfg.arch.clamp_exact:
            return lambda x: self.encode(x)[:, features]
        cols = [self.cfg.arch.clamp_columns(self, int(f)) for f in features]
        w_gate = torch.stack([c.w_gate for c in cols], 1)  # (d_in, n)
        b_gate = w_gate.new_tensor([c.b_gate for c in cols])  # (n,)
        threshold = w_gate.new_tensor([c.threshold for c in cols])
        w_mag = None if cols[0].w_mag is None else torch.stack([c.w_mag for c in cols], 1)
        b_mag = None if w_mag is None else w_gate.new_tensor([c.b_mag for c in cols])

        def encode(x: torch.Tensor) -> torch.Tensor:
            sae_in = self.sae_in(x)
            gate = torch.addmm(b_gate.to(sae_in.dtype), sae_in, w_gate.to(sae_in.dtype))  # (tokens, n)
            mag = gate if w_mag is None else torch.addmm(b_mag.to(sae_in.dtype), sae_in, w_mag.to(sae_in.dtype))
            return mag.relu() * (gate > threshold.to(sae_in.dtype))

        return encode

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(tokens, d_sae) -> (tokens, d_in). With per-token normalisation, `x` (the encoded input) is needed."""
        if self.W_dec is None:
            raise ValueError(f"{self.cfg.path}: loaded encoder-only (decoder=False), it cannot decode")
        y = acts @ self.W_dec + self.b_dec
        if self.cfg.normalize_activations == "none":
            return y
        if x is None:
            raise ValueError(f"decode needs the input x: normalize_activations={self.cfg.normalize_activations}")
        _, scale, shift = self.normalize(x)
        y = y * scale
        return y if shift is None else y + shift

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d_in) -> the SAE's reconstruction of x."""
        return self.decode(self.encode(x), x)

    # ---- disk format --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=torch.float32, decoder: bool = True) -> SAE:
        """The SAE in one directory, in `dtype` on `device`. `decoder=False` (capture: only which features fire is
        read) leaves W_dec on disk, unread: `W_dec` is None and `decode` refuses; half the memory of the SAE."""
        path = Path(path)
        cfg = read_config(path)
        w_path = path / "sae_weights.safetensors"
        if not w_path.is_file():
            raise SAELoadError(f"{w_path}: missing (an SAELens directory holds cfg.json and sae_weights.safetensors)")
        want = cfg.arch.shapes(cfg.d_in, cfg.d_sae) | {"W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
        try:
            with safe_open(str(w_path), "pt") as f:
                stored = set(f.keys())
                for name, shape in want.items():
                    if name not in stored:
                        raise SAELoadError(f"{w_path}: tensor {name} is missing (a {cfg.architecture} SAE needs it)")
                    if tuple(f.get_slice(name).get_shape()) != shape:
                        got = tuple(f.get_slice(name).get_shape())
                        raise SAELoadError(f"{w_path}: {name} has shape {got}, cfg.json implies {shape}")
                w = {name: f.get_tensor(name) for name in want if decoder or name != "W_dec"}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise SAELoadError(f"{w_path}: cannot be read as safetensors ({e})") from None
        for name, t in w.items():
            if not torch.isfinite(t.float()).all():
                raise SAELoadError(f"{w_path}: {name} holds NaN or Inf")
        s = cfg.scaling_factor
        if s != 1.0:  # expected_average_only_in: SAELens's fold_activation_norm_scaling_factor, in float32
            w = {k: v.float() for k, v in w.items()}
            w |= {"W_enc": w["W_enc"] * s, "b_dec": w["b_dec"] / s} | ({"W_dec": w["W_dec"] / s} if decoder else {})
            cfg.scaling_factor = 1.0
        return cls(cfg, {name: t.to(device=device, dtype=dtype) for name, t in w.items()})

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.tensors.items()},
            str(path / "sae_weights.safetensors"),
        )
        (path / "cfg.json").write_text(json.dumps(config_to_json(self.cfg, dtype), indent=2) + "\n")


def decoder_rows(path: str | Path, features: list[int]) -> torch.Tensor:
    """(n, d_in) float32: `SAE.load(path).W_dec[features]`, reading only those rows of the weights file."""
    cfg = read_config(path)
    w_path = Path(path) / "sae_weights.safetensors"
    try:
        with safe_open(str(w_path), "pt") as f:
            w = f.get_slice("W_dec")
            if tuple(w.get_shape()) != (cfg.d_sae, cfg.d_in):
                raise SAELoadError(
                    f"{w_path}: W_dec has shape {tuple(w.get_shape())}, cfg.json implies {(cfg.d_sae, cfg.d_in)}"
                )
            rows = torch.stack([w[f] for f in features]).to(torch.float32)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise SAELoadError(f"{w_path}: cannot be read as safetensors ({e})") from None
    if not torch.isfinite(rows).all():
        raise SAELoadError(f"{w_path}: W_dec holds NaN or Inf")
    return rows / cfg.scaling_factor if cfg.scaling_factor != 1.0 else rows  # as `SAE.load` folds it


def read_config(path: str | Path) -> SAEConfig:
    """The SAEConfig of one SAE directory, from its cfg.json alone (no weights read); SAELoadError naming the file."""
    cfg_path = Path(path) / "cfg.json"
    if not cfg_path.is_file():
        raise SAELoadError(f"{cfg_path}: missing (an SAELens directory holds cfg.json and sae_weights.safetensors)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAELoadError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SAELoadError(f"{cfg_path}: must hold a JSON object")
    cfg = config_from_json(raw, cfg_path)
    cfg.path = Path(path)
    return cfg


def config_from_json(raw: dict, where: Path | str = "cfg.json") -> SAEConfig:
    """Read a SAELens cfg.json (6.x layout, with the older flat `hook_name`/`activation_fn` keys accepted too)."""
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise SAELoadError(f"{where}: needs integer d_in and d_sae") from None
    meta = raw.get("metadata") or {}
    hook_name = meta.get("hook_name") or raw.get("hook_name") or ""
    if "transcoder" in str(raw.get("architecture", "")) or raw.get("hook_name_out") or "d_out" in raw:
        raise SAELoadError(
            f"{where}: a transcoder (it reads {hook_name or 'one hook'} and writes another tensor) is not supported"
        )
    arch = raw.get("architecture") or {"relu": "standard", "topk": "topk"}.get(raw.get("activation_fn", "relu"))
    if arch is None or arch not in ARCHITECTURES:
        shown = arch or raw.get("activation_fn")
        raise SAELoadError(f"{where}: architecture {shown!r} is not supported (one of {', '.join(ARCHITECTURES)})")
    if raw.get("rescale_acts_by_decoder_norm"):
        raise SAELoadError(f"{where}: rescale_acts_by_decoder_norm=true is not supported")
    if meta.get("hook_head_index") is not None or raw.get("hook_head_index") is not None:
        raise SAELoadError(f"{where}: an SAE on one attention head (hook_head_index) is not supported")
    norm = raw.get("normalize_activations") or "none"
    extra_keys = {"d_in", "d_sae", "architecture", "apply_b_dec_to_input", "k", "metadata", "hook_name"}
    extra = {k: v for k, v in raw.items() if k not in extra_keys | {"normalize_activations"}}
    extra["metadata"] = meta
    scaling_factor = 1.0
    if norm == "expected_average_only_in":
        scaling_factor, norm = _scaling_factor(raw, d_in, where), "none"
    try:
        return SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            architecture=arch,
            hook_name=hook_name,
            k=int(raw.get("k") or 0),
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            normalize_activations=norm,
            scaling_factor=scaling_factor,
            extra=extra,
        )
    except SAELoadError as e:
        raise SAELoadError(f"{where}: {e}") from None


def _scaling_factor(raw: dict, d_in: int, where) -> float:
    """expected_average_only_in's factor: `norm_scaling_factor` (SAELens's registry name), or Llama Scope's
    `dataset_average_activation_norm.in` (factor sqrt(d_in) / that norm, as SAELens's Llama Scope loader)."""
    factor = raw.get("norm_scaling_factor")
    avg = (raw.get("dataset_average_activation_norm") or {}).get("in")
    if factor is None and avg is not None:
        factor = d_in**0.5 / float(avg)
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not math.isfinite(factor) or factor <= 0:
        raise SAELoadError(
            f"{where}: normalize_activations='expected_average_only_in' needs its scaling factor: give "
            "'norm_scaling_factor' (or Llama Scope's 'dataset_average_activation_norm': {'in': ...}) in cfg.json"
        )
    return float(factor)


def config_to_json(cfg: SAEConfig, dtype: torch.dtype) -> dict:
    out = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
    }
    out.update({k: v for k, v in cfg.extra.items() if k not in ("metadata", "norm_scaling_factor")})
    out["metadata"] = {"sae_lens_version": SAELENS_LAYOUT_VERSION, **cfg.extra.get("metadata", {})}
    out["metadata"]["hook_name"] = cfg.hook_name
    if cfg.architecture == "topk":
        out["k"] = cfg.k
    out["architecture"] = cfg.architecture
    return out


def sae_dirs(given: list[str | Path]) -> list[Path]:
    """Each entry is one SAE directory (with cfg.json) or a directory of them (sorted); SAELoadError otherwise."""
    out = []
    for g in given:
        p = Path(g)
        if (p / "cfg.json").is_file():
            out.append(p)
        elif p.is_dir() and (subs := sorted(q for q in p.iterdir() if (q / "cfg.json").is_file())):
            out.extend(subs)
        else:
            raise SAELoadError(f"{p}: neither an SAE directory (with cfg.json) nor a directory of them")
    return out


def load_saes(
    given: list[str | Path],
    d_model: int | None = None,
    n_layers: int | None = None,
    device="cpu",
    dtype=torch.float32,
    weights: bool = True,
    decoder: bool = True,
) -> dict[int, SAE | SAEConfig]:
    """THE SAE loader: {layer: SAE} from SAE directories or directories of them, checked against the model when its
    hidden size and depth are given. `weights=False` reads only the cfg.json files ({layer: SAEConfig}), for a
    process that validates requests without holding weights; `decoder=False` loads encoders only (capture). One SAE
    per layer: the edits of a request name it by its layer. SAELoadError names the file and what is wrong."""
    out: dict[int, SAE | SAEConfig] = {}
    stream: dict[int, Path] = {}  # decoder layer output -> the SAE reading it (resid_post L is resid_pre L + 1)
    for p in sae_dirs(given):
        item = SAE.load(p, device=device, dtype=dtype, decoder=decoder) if weights else read_config(p)
        cfg = item.cfg if weights else item
        if d_model is not None and cfg.d_in != d_model:
            raise SAELoadError(f"{p}: d_in {cfg.d_in} does not match the model's hidden size {d_model}")
        if n_layers is not None and cfg.layer >= n_layers:
            raise SAELoadError(f"{p}: layer {cfg.layer} is outside the model's {n_layers} decoder layers")
        if cfg.layer in out:
            raise SAELoadError(f"{p}: a second SAE for layer {cfg.layer} (one SAE per layer; edits name it by layer)")
        same = cfg.hook.output_of()
        if same is not None and same in stream:
            raise SAELoadError(f"{p}: reads the same tensor ({cfg.hook_name}) as the SAE in {stream[same]}")
        if same is not None:
            stream[same] = p
        out[cfg.layer] = item
    return dict(sorted(out.items()))


def fraction_variance_explained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - SSE / total variance, over (tokens, d_in)."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1 - resid / total) if total > 0 else math.nan


def add_only_points(layers, configs: dict[int, SAEConfig], n_layers: int | None = None) -> dict[int, HookPoint]:
    """Add-only layers (`--steer-layers`: vectors without an SAE, at the layer's output) as {layer: resid_post hook};
    ValueError starting with the layer when it is outside decoder layers 0..n_layers-1 (if known) or an SAE of
    `configs` ({layer: SAEConfig}) already steers that tensor."""
    taken = {c.hook.canonical(): layer for layer, c in configs.items()}
    out = {}
    for layer in sorted(set(layers)):
        if layer < 0 or (n_layers is not None and layer >= n_layers):
            top = f"0-{n_layers - 1}" if n_layers is not None else "from 0"
            raise ValueError(f"{layer}: the model has decoder layers {top}")
        point = HookPoint(layer, "resid_post")
        owner = layer if layer in configs else taken.get(point)
        if owner is not None:
            raise ValueError(f"{layer}: the SAE at layer {owner} ({configs[owner].hook_name}) steers there already")
        out[layer] = point
    return out
