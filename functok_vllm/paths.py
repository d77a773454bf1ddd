"""Where the shipped assets live: the demo model, its SAEs and function tokens, the known SAE releases."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "functok-tiny"
DEMO_SAES = ROOT / "sae_weights" / "functok-tiny"
DEMO_FUNCTION_TOKENS = DEMO_MODEL / "function_tokens.json"
SAE_RELEASES = ROOT / "sae_weights" / "releases.json"
SHIPPED_SAES = ROOT / "sae_weights"  # sae_weights/<model directory name>/: the SAEs shipped for that model
SHIPPED_MODELS = ROOT / "models"  # models/<model directory name>/function_tokens.json: its function tokens
ANALYSIS_DIR = ROOT / "analysis"  # the shipped report, its figures and its prompts (the code is functok_vllm.analysis)


def shipped_saes(model: Path) -> Path | None:
    """The SAE directory shipped for a model (found by its directory's name), or None."""
    d = SHIPPED_SAES / Path(model).name
    return d if d.is_dir() else None


def shipped_function_tokens(model: Path) -> Path:
    """MODEL/function_tokens.json if the model directory has one, else the one shipped for its name (may not exist)."""
    beside = Path(model) / "function_tokens.json"
    return beside if beside.is_file() else SHIPPED_MODELS / Path(model).name / "function_tokens.json"
