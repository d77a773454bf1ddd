"""The steering playground: the page at `/`, its files under `/static/`, `POST /tokenize`, the feature finder routes.

The page is plain HTML, CSS and JavaScript shipped in `functok_vllm/server/static/` (no build step, nothing fetched
from elsewhere); it calls this server's own API, with the API key when the server has one (the page and its files
are public, see `middleware.OPEN_PATHS`). `POST /tokenize` (the shape of vLLM's) gives the page the prompt's token ids
exactly as a completion or chat request would encode them, so it can show which prompt positions a policy steers.
`CAPABILITIES` is what `GET /v1/steering` tells the page about optional API features; each flag turns on when the
API it names exists.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError
from pydantic import Field

from functok_vllm.engines.base import Engine
from functok_vllm.server.feature_routes import add_feature_routes
from functok_vllm.server.openai_errors import APIError
from functok_vllm.server.protocol import Message
from functok_vllm.steering import Strict

STATIC = Path(__file__).resolve().parent / "static"
CAPABILITIES = {
    "features": True,  # a generation request's "features": {"layers", "top_k"} -> choices[i].features per token
    "logprobs": True,  # logprobs / top_logprobs in completions and chat
    "readout": True,  # "readout": {"features", "vectors", "pool", "prompt"} -> choices[i].readout (docs/reading.md)
    "spec_lists": True,  # "steering": [spec, ...] -> one choice per spec
    "vectors": True,  # edits that name a steering vector instead of an SAE feature (/v1/steering/vectors)
}
# The page runs only its own files: no inline script, nothing from another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


class TokenizeRequest(Strict):
    model: str | None = None  # optional; when given it must be the served model
    prompt: str | None = Field(None, max_length=1 << 20)
    messages: list[Message] | None = Field(None, min_length=1)
    return_token_strs: bool = False


def add_playground(app: FastAPI, engine: Engine, analyzer) -> None:
    """Register the page, its static files, /tokenize and the feature finder (over `analyzer`'s model and thread)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_feature_routes(app, engine, analyzer)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        request.state.steered = "false"
        if body.model is not None and body.model != engine.model_name:
            msg = f"model: {body.model!r} does not exist; this server serves {engine.model_name!r}"
            raise APIError(404, msg, "model", "model_not_found")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give either 'prompt' or 'messages' (one of them)", "prompt")
        if body.prompt is not None:
            ids = engine.encode(body.prompt)
        else:
            try:
                ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
            except (TemplateError, ValueError) as e:
                msg = f"messages: the model's chat template cannot render them ({e})"
                raise APIError(400, msg, "messages") from None
        strs = [engine.tokenizer.decode([i]) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}
