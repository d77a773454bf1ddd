"""Resolve an SAE name to a local SAELens directory: a directory as is, or a public release fetched by sae-lens.

Names: `path/to/sae_dir`; `release:sae_id` for any id of any sae-lens release (`gpt2-small-res-jb:blocks.8.hook_
resid_pre`); `release:N` for a release listed in sae_weights/releases.json, whose sae_id_pattern is filled with N
(`gemma-scope-2b-pt-res-canonical:20`), or whose `sae_ids` names that layer's id (`gemma-scope-9b-pt-res:20`, the
paper's 1M-wide dictionary). A release is downloaded once by sae-lens's own loader (which converts and
folds it to the plain SAELens format) and saved under the cache directory, where `core.sae.SAE.load` reads it.
The server runs offline (functok_vllm.offline), so fetching a release needs HF_HUB_OFFLINE=0 and a reachable hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from functok_vllm.errors import CLIError
from functok_vllm.paths import SAE_RELEASES

DEFAULT_CACHE = Path(os.environ.get("FUNCTOK_CACHE", Path.home() / ".cache" / "functok")) / "saes"


def known_releases(path: str | Path = SAE_RELEASES) -> dict[str, dict]:
    """{release: entry} from releases.json."""
    return {e["release"]: e for e in json.loads(Path(path).read_text())["releases"]}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def parse_name(name: str, releases: dict[str, dict]) -> tuple[str, str]:
    """`release:sae_id` or `release:N` -> (release, sae_id)."""
    release, sep, rest = name.partition(":")
    if release in releases and not sep:
        raise CLIError(
            f"SAE release {release} needs an SAE: name it {release}:N with N in {_layers(releases[release])} "
            f"or {release}:<sae_id>"
        )
    if not sep or not release or not rest:
        raise CLIError(f"SAE {name!r} is neither an existing directory nor release:sae_id")
    if rest.isdigit() and release in releases:
        e = releases[release]
        if "sae_ids" in e:  # a few layers, each with its own id
            if rest not in e["sae_ids"]:
                raise CLIError(f"SAE release {release} lists layers {_layers(e)}, not {rest}")
            return release, e["sae_ids"][rest]
        lo, hi = e["layers"]
        if not lo <= int(rest) <= hi:
            raise CLIError(f"SAE release {release} covers layers {lo}..{hi}, not {rest}")
        return release, e["sae_id_pattern"].format(layer=int(rest))
    return release, rest


def _layers(e: dict) -> str:
    if "sae_ids" in e:
        return "/".join(e["sae_ids"])
    return f"{e['layers'][0]}..{e['layers'][1]} (sae id {e['sae_id_pattern']})"


def resolve_sae(name: str, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """A local SAELens directory for `name`; downloads a release on first use (see the module docstring)."""
    if Path(name).is_dir():
        return Path(name)
    release, sae_id = parse_name(name, known_releases())
    local = Path(cache_dir) / release / sae_id.replace("/", "__")
    if (local / "cfg.json").is_file() and (local / "sae_weights.safetensors").is_file():
        return local
    if hub_offline():
        raise CLIError(
            f"SAE release {release} (sae id {sae_id}) is not in {cache_dir} and must be downloaded from the Hugging "
            f"Face hub, but HF_HUB_OFFLINE=1; run once with HF_HUB_OFFLINE=0 on a machine that reaches the hub, or "
            f"pass a local SAE directory"
        )
    try:
        from sae_lens import SAE as LensSAE
    except ImportError:
        raise CLIError(f"SAE release {release} needs sae-lens to download it (pip install sae-lens)") from None
    try:
        sae = LensSAE.from_pretrained(release, sae_id, device="cpu", dtype="float32")
    except Exception as e:  # unknown ids raise ValueError; the hub client raises its own errors when unreachable
        raise CLIError(
            f"SAE release {release} (sae id {sae_id}) could not be fetched; releases need the Hugging Face hub: "
            f"{type(e).__name__}: {e}"
        ) from None
    sae.save_model(local)
    return local
