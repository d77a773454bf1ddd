"""Where the shipped assets live: the demo model, its SAEs and function tokens, the known SAE releases."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "functok-tiny"
DEMO_SAES = ROOT / "sae_weights" / "functok-tiny"
DEMO_FUNCTION_TOKENS = DEMO_MODEL / "function_tokens.json"
SAE_RELEASES = ROOT / "sae_weights" / "releases.json"
ANALYSIS_DIR = ROOT / "analysis"  # the shipped report, its figures and its prompts (the code is functok_vllm.analysis)
