"""The FastAPI app: OpenAI-style completions and chat with steering; models, steering and its library, analysis,
health, metrics.

Every request is validated here, at the edge (pydantic, then the steering spec against the loaded SAEs, then the
prompt against the context); the engine receives only requests it can run. Errors are OpenAI-style bodies.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from functok_vllm.core.hookpoint import HookPoint
from functok_vllm.core.spec import MODES, POSITIONS, ROLES, SpecError
from functok_vllm.engines.base import Engine, RequestError
from functok_vllm.errors import CLIError
from functok_vllm.library.store import Library, LibraryLimits, StoreError
from functok_vllm.positions import Positions, check_position_request
from functok_vllm.readout_request import ReadoutRequest
from functok_vllm.server import fanout
from functok_vllm.server.analysis import add_analysis_route
from functok_vllm.server.chat_roles import RolesUnavailable, role_codes
from functok_vllm.server.choices import Format, Prompt
from functok_vllm.server.config import ServerConfig
from functok_vllm.server.drain import Drain
from functok_vllm.server.finite import FiniteJSONResponse
from functok_vllm.server.library import PresetBook, add_library_routes
from functok_vllm.server.logprobs import TokenText
from functok_vllm.server.metrics import Metrics
from functok_vllm.server.middleware import Gate
from functok_vllm.server.openai_errors import APIError, api_error_handler, validation_handler
from functok_vllm.server.playground import CAPABILITIES, add_playground
from functok_vllm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Steering,
    capture_of,
    features_of,
    readout_of,
    resolve_steering,
    resolve_steering_list,
    stop_when_of,
)
from functok_vllm.server.serving import Job, complete, stream
from functok_vllm.steering import SteeringContext

log = logging.getLogger("functok.server")


def default_data_dir(model_name: str) -> Path:
    """Where the steering library lives without --data-dir: one directory per served model."""
    home = Path(os.environ.get("FUNCTOK_HOME", Path.home() / ".cache" / "functok"))
    return home / "library" / model_name.replace("/", "--")


def open_library(engine: Engine, config: ServerConfig) -> Library:
    limits = LibraryLimits(config.limits.max_vectors, config.limits.max_presets)
    root = config.data_dir or default_data_dir(engine.model_name)
    try:
        return Library(root, engine.steering_info().d_model, limits, writer=True)
    except (StoreError, OSError) as e:
        raise CLIError(f"--data-dir: {e}") from None


def build_presets(engine: Engine, config: ServerConfig, library: Library) -> PresetBook:
    """Every preset (the config's, checked now like a request's steering: CLIError names a bad one; the library's)."""
    ctx = SteeringContext(engine.steering_info(), config.steering, library.resolve)
    book = PresetBook(config.presets, library, ctx)
    for name, obj in config.presets.items():
        if name in library.presets():
            raise CLIError(f"presets.{name}: a preset of that name is stored in the library {library.root} too")
        try:
            book.spec(name, obj, f"presets.{name}")
        except SpecError as e:
            raise CLIError(f"{e.field}: {e.message}") from None
    return book


def create_app(engine: Engine, config: ServerConfig, library: Library | None = None) -> FastAPI:
    library = library or open_library(engine, config)
    presets = build_presets(engine, config, library)
    ctx = presets.ctx
    limits = config.limits
    metrics = Metrics(engine, config.monitors)
    started = int(time.time())
    drain = Drain(limits.drain_timeout)
    stopped = False

    async def stop_engine():  # once: at the drain deadline (aborting what still runs) or at shutdown
        nonlocal stopped
        if not stopped:
            stopped = True
            await engine.shutdown()

    @asynccontextmanager
    async def lifespan(_app):
        await engine.start()
        log.info("serving %s (context %d tokens)", engine.model_name, engine.max_model_len)
        yield
        await stop_engine()
        if analyzer is not None:
            analyzer.close()

    app = FastAPI(title="functok-vllm", lifespan=lifespan, default_response_class=FiniteJSONResponse)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(
        Gate,
        metrics=metrics,
        api_key=config.api_key,
        max_body_bytes=limits.max_body_bytes,
        drain=drain,
        metrics_public=config.metrics_public,
        admin_key=config.admin_api_key,
        max_vector_bytes=limits.max_vector_bytes,
        allowed_hosts=config.allowed_hosts,
        body_timeout=limits.body_timeout,
    )
    app.state.drain, app.state.stop_engine, app.state.library = drain, stop_engine, library
    analyzer = add_analysis_route(app, engine, limits)
    add_playground(app, engine, analyzer)  # the page at /, /static/, /tokenize, /v1/features/...
    add_library_routes(
        app, library, presets, engine.steering_info(), config.steering, engine, limits
    )  # /v1/steering/vectors, presets

    @app.get("/health")
    async def health():
        if not engine.is_healthy():
            raise APIError(503, "the engine has stopped", code="engine_dead")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": engine.model_name, "object": "model", "created": started, "owned_by": "functok"}
        return {"object": "list", "data": [card | {"max_model_len": engine.max_model_len}]}

    @app.get("/v1/steering")
    async def steering():
        info = engine.steering_info()
        return {
            "model": engine.model_name,
            "layers": [
                {"layer": layer, "d_sae": d_sae, "clamp": info.clamp_ok[layer], **info.sae.get(layer, {})}
                for layer, d_sae in sorted(info.d_sae.items())
            ],
            "function_tokens": {
                "count": len(info.function_token_ids),
                "ids": info.function_token_ids,
                "tokens": info.function_token_strings,
            },
            "steer_layers": [{"layer": n, "hook_name": HookPoint(n, "resid_post").name} for n in info.add_layers],
            "presets": presets.objects(),
            "vectors": sorted(library.vectors()),
            "modes": list(MODES),
            "positions": list(POSITIONS),
            "position_object": {"fields": list(Positions.model_fields), "roles": list(ROLES)},
            "limits": asdict(limits) | asdict(config.steering),
            "capabilities": CAPABILITIES,
            "monitors": metrics.monitors.cards(),
        }

    tt = TokenText(engine.tokenizer)

    def prepare(body, request: Request) -> tuple[list[Steering], bool]:
        """(the steering of each spec, whether `steering` was a list), checked; the body's other combinations."""
        if body.model != engine.model_name:
            msg = f"model: {body.model!r} does not exist; this server serves {engine.model_name!r}"
            raise APIError(404, msg, "model", "model_not_found")
        body.check()
        listed = resolve_steering_list(body, presets, ctx, limits.max_choices)
        steerings = listed or [resolve_steering(body, presets, ctx)]
        request.state.steered = str(any(s.spec is not None for s in steerings)).lower()
        return steerings, listed is not None

    async def run(kind, body, prompts: list[Prompt], max_tokens, request: Request, t0: float, messages=None):
        steerings, listed = prepare(body, request)
        for s in steerings:  # what only this edge knows: the vocabulary, and whether the prompt has chat roles
            try:
                check_position_request(s.spec, f"{s.source}.positions", engine.vocab_size, kind == "chat")
            except SpecError as e:
                raise APIError(400, f"{e.field}: {e.message}", e.field) from None
        if messages is not None and any(s.spec is not None and s.spec.roles for s in steerings):
            try:
                prompts[0].roles = role_codes(engine.tokenizer, messages, prompts[0].ids)
            except RolesUnavailable as e:
                where = next(f"{s.source}.positions.roles" for s in steerings if s.spec is not None and s.spec.roles)
                raise APIError(400, f"{where}: {e}", where) from None
        fr = features_of(body, engine.steering_info())
        cap = capture_of(body, engine.steering_info())
        readout = readout_of(body, ctx, limits.max_readouts)
        stop, engine_readout = stop_when_of(body, ctx), readout
        if stop is not None:  # its series goes after the request's own, before the server's monitors
            own = readout or ReadoutRequest((), (), False, ())
            stop = replace(stop, series=len(own.probes))
            engine_readout = own.joined(ReadoutRequest((stop.probe,), (stop.label,), False, ()))
        engine_readout = engine_readout.joined(metrics.monitors.request) if engine_readout else metrics.monitors.request
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        choices = fanout.plan(prompts, steerings, body.n, limits, listed)
        param = "messages" if kind == "chat" else "prompt"
        caps = []
        for p in prompts:
            try:
                engine.check_prompt(p.ids, max_tokens, param)
            except RequestError as e:
                raise APIError(400, str(e), e.param, e.code) from None
            caps.append(
                max_tokens if max_tokens is not None else min(limits.max_tokens, engine.max_model_len - len(p.ids))
            )
        fanout.check_features(fr, choices, caps, limits)
        fanout.check_capture(cap, choices, caps, limits, engine.steering_info().d_model)
        if kind == "chat":
            lp, prompt_lp, echo = ((body.top_logprobs or 0) if body.logprobs else None), None, False
        else:
            lp, echo = body.logprobs, body.echo
            prompt_lp = lp if echo else None
        fanout.check_prompt_scoring(prompt_lp, choices, limits)
        extras = {"logprobs": lp, "prompt_logprobs": prompt_lp, "features": fr, "capture": cap}
        extras["readout"], extras["stop_when"] = engine_readout, stop
        await fanout.start(engine, body, choices, caps, rid, extras, limits, metrics, t0)
        fmt = Format(
            kind, tt, lp is not None, echo, body.return_token_ids, fr is not None, fr is not None and fr.prompt
        )
        fmt.capture, fmt.readout, fmt.stop_when = cap is not None, readout, stop
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        job = Job(
            kind,
            rid,
            engine.model_name,
            choices,
            fmt,
            None if listed else steerings[0],
            include_usage,
            t0,
            limits.request_timeout,
        )
        if body.stream:
            return StreamingResponse(stream(job, metrics), media_type="text/event-stream")
        return FiniteJSONResponse(await complete(job, request, metrics))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.monotonic()
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append(Prompt(engine.encode(p), p))
            else:
                ids = list(p)
                if ids and not 0 <= min(ids) <= max(ids) < engine.vocab_size:  # before decoding them (echo)
                    bad = min(ids) if min(ids) < 0 else max(ids)
                    msg = f"prompt: token id {bad} is outside the vocabulary [0, {engine.vocab_size})"
                    raise APIError(400, msg, "prompt", "invalid_value")
                prompts.append(Prompt(ids, engine.tokenizer.decode(ids) if body.echo else ""))
        given = "max_tokens" in body.model_fields_set  # OpenAI's default of 16, within this server's cap
        max_tokens = body.max_tokens if given else min(body.max_tokens, limits.max_tokens)
        return await run("completions", body, prompts, max_tokens, request, t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        t0 = time.monotonic()
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = engine.encode_chat(messages)
        except (TemplateError, ValueError) as e:  # ValueError: the tokenizer has no chat template
            raise APIError(400, f"messages: the model's chat template cannot render them ({e})", "messages") from None
        return await run("chat", body, [Prompt(ids, "")], body.max_new(), request, t0, messages)

    return app


async def _http_error(_request, exc: HTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), code=None, headers=exc.headers).response()


async def _server_error(_request, exc: Exception) -> JSONResponse:
    log.error("internal error: %s", type(exc).__name__)
    return APIError(500, f"internal server error ({type(exc).__name__})", code="internal_error").response()
