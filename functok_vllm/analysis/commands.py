"""`functok analyze <cmd>`: coverage, reactivation(-study), loss-split, features, steer-sweep, steer-study,
case-study, report."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from functok_vllm.paths import DEMO_MODEL, shipped_function_tokens, shipped_saes


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} must be at least 1")
    return v


def fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{s} must be in (0, 1]")
    return v


def _runner(module: str):
    def run(args):
        import torch

        torch.set_num_threads(args.threads)
        if args.function_tokens is None:
            args.function_tokens = str(shipped_function_tokens(Path(args.model)))
        if getattr(args, "saes", "") is None:
            shipped = shipped_saes(Path(args.model))
            args.saes = str(shipped) if shipped is not None else str(Path(args.model))
        return importlib.import_module(f"functok_vllm.analysis.{module}").main(args)

    return run


def _add(sub, name: str, module: str, help: str, corpus: bool = True, saes: bool = True, max_tokens=None):
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--model", default=str(DEMO_MODEL), help="model directory (transformers)")
    if saes:
        p.add_argument(
            "--saes", default=None, help="directory of SAELens SAE directories (default: sae_weights/MODEL_NAME)"
        )
    p.add_argument(
        "--function-tokens",
        default=None,
        help="function-token JSON (default: MODEL/function_tokens.json, else models/MODEL_NAME/function_tokens.json)",
    )
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", default=f"out/analysis/{name}", help="output directory")
    if corpus:
        p.add_argument("--corpus", nargs="+", default=None, help="text files (default: held-out split of the corpus)")
        p.add_argument("--max-tokens", type=positive_int, default=max_tokens, help="token budget (default: all)")
        p.add_argument("--seq-len", type=positive_int, default=256)
        p.add_argument("--batch-size", type=positive_int, default=8)
    p.set_defaults(func=_runner(module))
    return p


def add_engine(p, how: str) -> None:
    p.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        default="transformers",
        help=f"run the forwards on transformers (default) or on vLLM ({how})",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        help="--engine vllm: shard the model over this many GPUs (on CPU: ranks sharing this process's cores)",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `analyze` and its commands on the `functok` subparsers."""
    a = subparsers.add_parser("analyze", help="offline analysis of function tokens and SAE features")
    sub = a.add_subparsers(dest="analysis", required=True)

    p = _add(sub, "coverage", "coverage", "token-feature bipartite graph and cumulative feature coverage by rank")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="SAE layers (default: all)")
    p.add_argument("--keep-sinks", action="store_true", help="count attention-sink positions too (default: left out)")
    add_engine(p, "capture mode of the steering worker extension")
    p.add_argument(
        "--chunk-mb",
        type=positive_int,
        default=2048,
        help="MiB of (rows, d_sae) intermediates per SAE encode chunk (default 2048: 512 rows at d_sae 2^20 in bf16)",
    )
    p.add_argument(
        "--sae-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="SAE encoder dtype, on either engine (encoders only are loaded; see BENCHMARKS.md for how closely a lower "
        "dtype's firing sets agree with float32)",
    )
    p.add_argument(
        "--model-dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default="float32",
        help="--engine vllm: the model's dtype (auto: its config's, e.g. bfloat16 for Gemma-2; default float32, in "
        "which vLLM's tables equal the transformers engine's); the transformers engine always runs float32",
    )
    p.add_argument(
        "--data-parallel-size",
        type=positive_int,
        default=1,
        help="split the corpus windows over this many engine processes, each on its own GPU(s) (on CPU: its own "
        "share of the cores), and merge their tables; equal to one process's",
    )
    p.add_argument("--plan", action="store_true", help="print the memory and time the run needs, load nothing, exit")
    p.add_argument(
        "--plan-device", choices=["cpu", "a100", "h100", "h200"], default="cpu", help="device the plan is for"
    )
    p.add_argument("--l0", type=float, default=100.0, help="features firing per token, for the plan (default 100)")

    p = _add(sub, "reactivation", "reactivation", "re-activated and predictive features at function tokens", False)
    p.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} or {"text": ...} per line')
    p.add_argument("--layers", type=int, nargs="+", default=None, help="SAE layers (default: all)")
    p.add_argument("--top-frac", type=fraction, default=0.01, help="predictive: next token in the top share of lens")

    p = _add(sub, "loss-split", "loss_split", "next-token loss by function/content class over checkpoints", saes=False)
    p.add_argument("--checkpoints", nargs="+", default=None, help="model dirs (default: MODEL/checkpoints/* + MODEL)")
    add_engine(p, "next-token losses from its prompt logprobs, one engine per checkpoint")

    p = _add(sub, "features", "features", "top contexts and logit-lens tokens of features", max_tokens=32768)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--features", type=int, nargs="+", default=None, help="feature ids (default: the most frequent)")
    p.add_argument("--top", type=positive_int, default=8, help="how many frequent features when none are given")

    p = _add(sub, "steer-sweep", "steer_sweep", "steer at last function vs last content vs all positions", False)
    p.add_argument("--prompt", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--feature", type=int, required=True)
    p.add_argument("--strengths", type=float, nargs="+", default=[0, 10, 20, 40, 80, 160])
    p.add_argument("--target", default=None, help="target token (default: the feature's top logit-lens token)")
    p.add_argument("--generate", type=int, default=12, help="greedy tokens to generate per policy")

    p = _add(sub, "reactivation-study", "reactivation_study", "re-activation against a cross-prompt null", False)
    p.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} or {"text": ...} per line')
    p.add_argument("--layers", type=int, nargs="+", default=None, help="SAE layers (default: all)")
    p.add_argument("--ablate", type=positive_int, default=8, help="features ablated per prompt, layer and group")

    p = _add(sub, "steer-study", "steer_study", "position-matched steering against a random direction", False)
    p.add_argument("--prompts", required=True, help="JSONL prompts ending on a function token")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--n-prompts", type=positive_int, default=16)
    p.add_argument("--features", type=positive_int, default=8, help="candidate features (top logit-lens words)")
    p.add_argument("--multiples", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="x median norm")
    p.add_argument("--generate", type=int, default=8, help="continuation tokens for the fluency figure")

    p = _add(sub, "case-study", "case_study", "minimal-pair capital questions through the chat template", False)
    p.add_argument("--layer", type=int, required=True)

    p = _add(
        sub, "report", "report", "regenerate a model's REPORT.md and figures (analysis/, analysis/MODEL_NAME/)", False
    )
    p.set_defaults(out=None)
    p.add_argument("--prompts", default=None, help="JSONL prompt set (default: OUT/prompts.jsonl, made if missing)")
    p.add_argument("--corpus", nargs="+", default=None, help="text files to analyse (default: the held-out split)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="token budget (default: every token)")
    p.add_argument("--loss-tokens", type=positive_int, default=24576, help="held-out tokens per checkpoint (loss)")
    p.add_argument(
        "--steer-prompts", type=positive_int, default=12, help="prompts of the steering study (its cost grows with it)"
    )
    p.add_argument("--steer-features", type=positive_int, default=6, help="candidate features per steering prompt")
    p.add_argument("--rebuild-prompts", action="store_true", help="rewrite the prompt set from held-out text first")
    return a
