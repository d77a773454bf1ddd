"""The vLLM integration's settings (`additional_config["functok"]`) and the steering spec carried in `extra_args`.

    vllm serve MODEL --worker-extension-cls functok_vllm.engines.vllm.worker.SteeringWorkerExtension \\
        --additional-config '{"functok": {"saes": ["sae_weights/functok-tiny"], "function_tokens": "..."}}'

Keys (all optional; without them the SAEs and function tokens shipped for the model are used, found by the model
directory's name: sae_weights/NAME and models/NAME/function_tokens.json, e.g. for functok-tiny and SmolLM2):
  saes             SAE directories (cfg.json inside) or directories of them
  function_tokens  the function-token JSON written by `functok function-tokens` (default: MODEL/function_tokens.json
                   if the model directory has one, else the one shipped for its name)
  max_edits, max_clamps, max_projections, max_conditions, max_condition_columns, max_abs_strength
                   the steering limits (`functok_vllm.steering.SteeringLimits`, the same as `functok serve`'s flags)
  steer_layers     decoder layers without an SAE where steering vectors may be added (at resid_post), as
                   `functok serve --steer-layers`: the graph is built with them
  library          a steering library directory (`functok serve --data-dir`): the API process resolves vector names
                   in requests (`{"vector": "name", "strength": s}`) from it; read-only, nothing here writes to it
  capture_only     true: the engine is for capture (offline analysis, `capture_session.py`) only; the workers load
                   each SAE's encoder alone (no W_dec: half the memory) and install no steering, and the API process
                   refuses every request that asks to steer or read features (a 400, never silently unsteered)
  sae_dtype        with capture_only: the encoders' dtype ("float32", "bfloat16", "float16"; default the model's)

Everything here is torch-free apart from what the core imports, and reads SAE metadata from cfg.json only, so the API
process validates specs without loading weights. A request's spec travels as `extra_args["steering"]`: a JSON string
(what the OpenAI server's `vllm_xargs` allows), for offline `LLM` users a dict, or the `SteeringSpec` that
`functok serve --engine vllm` parsed at its edge; the API process replaces it with the canonical `SteeringSpec.key()`
string (the user's form), which the workers parse with the same `parse_steering`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

from functok_vllm.core.sae import SAEConfig, add_only_points, load_saes, sae_dirs
from functok_vllm.paths import shipped_function_tokens, shipped_saes
from functok_vllm.steering import SteeringInfo, SteeringLimits

CONFIG_KEY = "functok"  # additional_config[CONFIG_KEY]
XARG = "steering"  # sampling_params.extra_args[XARG]
EXTENSION = "functok_vllm.engines.vllm.worker.SteeringWorkerExtension"
LIMIT_KEYS = {f.name for f in fields(SteeringLimits)}
VECTORS = "functok_vectors"  # sampling_params.extra_args[VECTORS]: the contents of the vectors a spec names
KNOWN = {"saes", "function_tokens", "steer_layers", "library", "capture_only", "sae_dtype"} | LIMIT_KEYS
SAE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class FunctokConfig:
    saes: tuple[Path, ...]  # one directory per SAE, expanded
    function_tokens: Path | None  # None only without SAEs
    limits: SteeringLimits = field(default_factory=SteeringLimits)
    steer_layers: tuple[int, ...] = ()
    library: Path | None = None
    capture_only: bool = False  # encoder-only SAEs, no steering: see the module docstring
    sae_dtype: str | None = None  # capture_only: the encoders' dtype; None: the model's

    @cached_property
    def sae_configs(self) -> dict[int, SAEConfig]:
        """{layer: SAEConfig} from the cfg.json files alone (the API process holds no weights)."""
        return load_saes(list(self.saes), weights=False)

    @cached_property
    def info(self) -> SteeringInfo:
        """What requests are checked against (function tokens are not needed for that; d_model: the SAEs')."""
        return SteeringInfo.build(self.sae_configs, None, self.steer_layers)

    def info_for(self, d_model: int) -> SteeringInfo:
        """`info` with the model's width (which checks a vector's, and which a config without SAEs cannot know)."""
        return replace(self.info, d_model=d_model)


def cpu_defaults(world_size: int = 1) -> None:
    """Without CUDA: VLLM_TARGET_DEVICE=cpu (our CPU build's version string does not say "cpu", so vLLM would not
    detect it) and a 1 GiB KV cache, unless already set; with several ranks (tensor x pipeline parallel), each rank
    bound to its own share of this process's cores (`VLLM_CPU_OMP_THREADS_BIND`, unless set), without which vLLM's CPU
    backend refuses to start several workers on one NUMA node. Call before vLLM resolves its platform."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if world_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(sorted(os.sched_getaffinity(0)), world_size)


def offline_in_process(world_size: int) -> None:
    """For a one-shot offline run in a process of its own (`functok analyze ... --engine vllm`): at one rank, vLLM's
    engine core and worker run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless set): two processes fewer
    to start and import vLLM in (coverage of 3,000 tokens on the demo model: 16 s instead of 30 s on 2 cores, the
    same tables), and on a CPU the worker uses this process's threads (`--threads`) instead of vLLM's binding to
    one core. Several ranks need vLLM's worker processes. Call before the first `vllm.LLM`."""
    if world_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def cpu_binding(cores: list[int], ranks: int) -> str:
    """vLLM's `VLLM_CPU_OMP_THREADS_BIND` for `ranks` workers over `cores`: consecutive shares, e.g. "0|1" for two
    ranks on cores [0, 1], "0-3|4-7" on eight. ValueError when there are fewer cores than ranks."""
    if len(cores) < ranks:
        raise ValueError(
            f"{ranks} tensor/pipeline-parallel ranks need at least {ranks} cores; this process has {len(cores)}"
        )
    per = len(cores) // ranks
    shares = [cores[r * per : (r + 1) * per] for r in range(ranks)]
    return "|".join(",".join(map(str, s)) for s in shares)


def from_additional_config(additional_config, model: str | None = None) -> FunctokConfig:
    """The settings from `vllm_config.additional_config` (a dict, or anything else meaning "defaults") for `model`
    (vLLM's model name or directory)."""
    raw = additional_config.get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
    return _parse(raw, model)


def _parse(raw, model: str | None) -> FunctokConfig:
    if not isinstance(raw, dict) or set(raw) - KNOWN:
        unknown = sorted(set(raw) - KNOWN) if isinstance(raw, dict) else raw
        raise ValueError(f"additional_config.{CONFIG_KEY}: unknown keys {unknown}; known: {sorted(KNOWN)}")
    steer_layers = raw.get("steer_layers", [])
    if not isinstance(steer_layers, list) or not all(isinstance(x, int) and x >= 0 for x in steer_layers):
        raise ValueError(f"additional_config.{CONFIG_KEY}.steer_layers: a list of layer numbers, got {steer_layers!r}")
    library = raw.get("library")
    if library is not None and not isinstance(library, str):
        raise ValueError(f"additional_config.{CONFIG_KEY}.library: a directory, got {library!r}")
    capture_only, sae_dtype = raw.get("capture_only", False), raw.get("sae_dtype")
    if not isinstance(capture_only, bool):
        raise ValueError(f"additional_config.{CONFIG_KEY}.capture_only: true or false, got {capture_only!r}")
    if sae_dtype is not None and sae_dtype not in SAE_DTYPES:
        raise ValueError(f"additional_config.{CONFIG_KEY}.sae_dtype: one of {list(SAE_DTYPES)}, got {sae_dtype!r}")
    if sae_dtype is not None and not capture_only:  # steering adds decoder rows to the stream in the model's dtype
        raise ValueError(f"additional_config.{CONFIG_KEY}.sae_dtype: only with capture_only (steering: the model's)")
    shipped = shipped_saes(Path(model)) if model else None
    given = raw.get("saes", [str(shipped)] if shipped is not None else [])
    if isinstance(given, str):
        given = [given]
    if "function_tokens" in raw:
        fn = Path(raw["function_tokens"])
    elif model is not None and shipped_function_tokens(Path(model)).is_file():
        fn = shipped_function_tokens(Path(model))
    elif given:
        raise ValueError(f"additional_config.{CONFIG_KEY}.function_tokens: required with `saes` for model {model!r}")
    else:
        fn = None  # no SAEs: nothing to steer, no function tokens needed
    if fn is not None and not fn.is_file():
        raise ValueError(f"additional_config.{CONFIG_KEY}.function_tokens: {fn} does not exist")
    try:
        limits = SteeringLimits(**{k: raw[k] for k in LIMIT_KEYS if k in raw})
    except ValueError as e:
        raise ValueError(f"additional_config.{CONFIG_KEY}.{e}") from None
    try:
        cfg = FunctokConfig(
            tuple(sae_dirs(given)),
            fn,
            limits,
            tuple(sorted(set(steer_layers))),
            Path(library) if library else None,
            capture_only,
            sae_dtype,
        )
    except ValueError as e:
        raise ValueError(f"additional_config.{CONFIG_KEY}.saes: {e}") from None
    cfg.sae_configs  # noqa: B018  (read every cfg.json now: a bad directory fails at startup)
    try:
        add_only_points(cfg.steer_layers, cfg.sae_configs)
    except ValueError as e:
        raise ValueError(f"additional_config.{CONFIG_KEY}.steer_layers: {e}") from None
    return cfg
