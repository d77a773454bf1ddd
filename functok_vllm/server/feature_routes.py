"""GET /v1/features/search and GET /v1/features/{layer}/{feature}: find SAE features by their logit-lens tokens and
read a feature's dashboard (top tokens, top-activating corpus contexts).

The dashboards come from `FeatureIndex` (computed once per SAE on the analysis thread, cached in memory and on
disk). Until a layer's table is in memory both routes answer 202 with the progress of the job that computes it, or
loads it from disk after a restart in well under a second (`"object": "features.progress"`, `Retry-After: 1`); a
client polls. Engines whose model is not in this process (vLLM), or a server without SAEs, answer 501. Inputs are
parsed here, not by FastAPI, so a bad one is a 400/404 naming `layer`, `feature`, `q` or `limit`, like every other
error of this server.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from functok_vllm.engines.base import Engine
from functok_vllm.server.feature_index import LEFT, RIGHT, FeatureIndex, FeatureTable, token_budget
from functok_vllm.server.openai_errors import APIError
from functok_vllm.validation import shown

SEARCH, FEATURE = "/v1/features/search", "/v1/features/{layer}/{feature}"
MAX_LIMIT = 100
MAX_QUERY = 100  # characters
SHOWN_TOKENS = 5  # lens tokens shown per search result


def _int(value: str | None, name: str, default: int | None = None, status: int = 400) -> int | None:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise APIError(status, f"{name}: {shown(value)} is not an integer", name) from None


def _within_document(ids: list[int], eos: int, left: bool) -> list[int]:
    """The part of a context window on the activating token's side of any EOS (contexts never cross documents)."""
    if eos not in ids:
        return ids
    return ids[len(ids) - ids[::-1].index(eos) :] if left else ids[: ids.index(eos)]


class FeatureRoutes:
    """Validation and rendering around a `FeatureIndex` (None: `why` says what is missing)."""

    def __init__(self, engine: Engine, index: FeatureIndex | None, why: str | None):
        self.engine, self.index, self.why = engine, index, why

    def layer(self, value: str | None, status: int) -> int:
        layer = _int(value, "layer", status=status)
        saes = self.index.am.saes
        if layer not in saes:
            have = ", ".join(map(str, sorted(saes)))
            code = "not_found" if status == 404 else "invalid_value"
            msg = f"layer: no SAE is loaded at layer {layer} (layers with SAEs: {have})"
            raise APIError(status, msg, "layer", code)
        return layer

    def tables(self, layers: list[int]) -> list[FeatureTable] | JSONResponse:
        """The layers' tables; otherwise a 202 with the progress of the job that makes (or loads) them."""
        index = self.index
        got = [index.get(layer) for layer in layers]
        if all(t is not None for t in got):
            return got
        error = index.take_error()
        if error is not None:
            raise APIError(500, f"computing the feature dashboards failed: {error}", code="internal_error")
        p = index.progress
        pct = round(100 * p.fraction())
        body = {
            "object": "features.progress",
            "status": "computing",
            "layers": list(p.layers),
            "stage": p.stage,
            "progress": round(p.fraction(), 3),
            "corpus_tokens": token_budget(),
            "message": f"computing the feature dashboards ({p.stage}, {pct}%); ask again in a second",
        }
        return JSONResponse(body, status_code=202, headers={"Retry-After": "1"})

    def search(self, tables: list[FeatureTable], q: str, limit: int) -> list[dict]:
        """Features with a logit-lens token containing q (case-insensitive): exact tokens first, then by the rank of
        the matching token in the feature's lens list, then by its score."""
        want = q.strip().lower()
        hits = []
        for t in tables:
            for f, row in enumerate(t.lens_text):
                for rank, tok in enumerate(row):
                    if want in tok:
                        hits.append(((tok != want, rank, -float(t.lens_scores[f, rank])), t, f, rank))
                        break
        hits.sort(key=lambda h: h[0])
        return [self.result(t, f, rank) for _, t, f, rank in hits[:limit]]

    def result(self, t: FeatureTable, f: int, rank: int) -> dict:
        text = self.index.token_text
        ids = t.lens_ids[f].tolist()
        return {
            "layer": t.layer,
            "feature": f,
            "match": {"token": text(ids[rank]), "id": ids[rank], "rank": rank, "score": float(t.lens_scores[f, rank])},
            "top_tokens": [text(i) for i in ids[:SHOWN_TOKENS]],
            "frequency": int(t.active[f]) / max(t.text_tokens, 1),
        }

    def card(self, t: FeatureTable, f: int) -> dict:
        decode, text, eos = self.index.am.decode, self.index.token_text, self.index.am.eos_id
        stream = t.stream
        contexts = []
        for act, pos in zip(t.ctx_acts[f].tolist(), t.ctx_pos[f].tolist(), strict=True):
            if pos < 0 or act <= 0:
                continue
            contexts.append(
                {
                    "activation": act,
                    "position": pos,
                    "left": decode(_within_document(stream[max(0, pos - LEFT) : pos].tolist(), eos, left=True)),
                    "token": text(int(stream[pos])),
                    "right": decode(_within_document(stream[pos + 1 : pos + 1 + RIGHT].tolist(), eos, left=False)),
                }
            )
        return {
            "object": "feature",
            "model": self.engine.model_name,
            "layer": t.layer,
            "feature": f,
            "d_sae": t.d_sae,
            "frequency": int(t.active[f]) / max(t.text_tokens, 1),
            "corpus_tokens": t.text_tokens,
            "logit_lens": [
                {"token": text(i), "id": i, "score": s}
                for i, s in zip(t.lens_ids[f].tolist(), t.lens_scores[f].tolist(), strict=True)
            ],
            "contexts": contexts,
        }


def add_feature_routes(app: FastAPI, engine: Engine, analyzer) -> FeatureRoutes:
    """Register the two routes over the analysis model and thread of `analyzer` (None: they answer 501)."""
    from functok_vllm.engines.hf.engine import HFEngine

    index, why = None, None
    if not isinstance(engine, HFEngine):
        why = "the feature finder needs the transformers engine (--engine hf); this model runs in vLLM's processes"
    elif not engine.saes or analyzer is None:
        why = "the feature finder needs SAEs, and this server has none loaded (--sae)"
    else:
        index = FeatureIndex(analyzer.am, engine, analyzer.pool)
    routes = FeatureRoutes(engine, index, why)

    @app.get(SEARCH)
    async def search(request: Request, q: str | None = None, layer: str | None = None, limit: str | None = None):
        request.state.steered = "false"
        if q is None or not q.strip():
            raise APIError(400, "q: give the text to look for among the features' logit-lens tokens", "q")
        if len(q) > MAX_QUERY:
            raise APIError(400, f"q: {len(q)} characters; at most {MAX_QUERY} are allowed", "q")
        n = _int(limit, "limit", default=20)
        if not 1 <= n <= MAX_LIMIT:
            raise APIError(400, f"limit: {n} is outside [1, {MAX_LIMIT}]", "limit")
        if routes.index is None:
            raise APIError(501, why, code="not_implemented")
        layers = [routes.layer(layer, 400)] if layer not in (None, "") else sorted(index.am.saes)
        tables = routes.tables(layers)
        if isinstance(tables, JSONResponse):
            return tables
        results = routes.search(tables, q, n)
        return {"object": "list", "query": q, "layers": layers, "data": results}

    @app.get(FEATURE)
    async def feature(request: Request, layer: str, feature: str):
        request.state.steered = "false"
        if routes.index is None:
            raise APIError(501, why, code="not_implemented")
        lay = routes.layer(layer, 404)
        f = _int(feature, "feature", status=404)
        d_sae = index.am.saes[lay].d_sae
        if not 0 <= f < d_sae:
            msg = f"feature: {f} is outside [0, {d_sae}) for the SAE at layer {lay}"
            raise APIError(404, msg, "feature", "not_found")
        tables = routes.tables([lay])
        if isinstance(tables, JSONResponse):
            return tables
        return routes.card(tables[0], f)

    return routes
