"""vLLM's outputs as the engine interface's extras: SamplingParams from ours, logprobs as `TokenLogprob`s, and the
feature entries read from the workers.

Log-probabilities come from vLLM itself (`logprobs` / `prompt_logprobs` of its SamplingParams), which reports the
log-softmax of the raw logits under its default `logprobs_mode="raw_logprobs"`; `VLLMEngine` refuses to start with any
other mode. Features have no place in vLLM's outputs: `FeatureReader` fetches them from the workers
(`feature_op.py`) with one `collective_rpc` for all the requests that ask at the same time.
"""

from __future__ import annotations

import asyncio
import logging

from functok_vllm.engines.base import GenerateRequest, TokenLogprob

log = logging.getLogger("functok.engine")


def vllm_sampling(request: GenerateRequest, max_tokens: int, extra_args: dict | None):
    """vLLM SamplingParams for our request (DELTA outputs). max_tokens 0 (score only) asks vLLM for one token, which
    `VLLMEngine` drops (vLLM's own server does the same for echo with max_tokens 0)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    p = request.sampling
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=max(p.top_k, 0),
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        min_tokens=p.min_tokens,
        max_tokens=max(max_tokens, 1),
        stop=list(p.stop) or None,
        stop_token_ids=list(p.stop_token_ids) or None,
        skip_special_tokens=p.skip_special_tokens,
        include_stop_str_in_output=p.include_stop_str_in_output,
        seed=p.seed,
        ignore_eos=p.ignore_eos,
        logprobs=request.logprobs,
        prompt_logprobs=request.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
    )


def token_logprob(token: int, d: dict, n: int) -> TokenLogprob:
    """One position of vLLM's logprobs ({token id: Logprob(logprob, rank, ...)}, the token's own entry included)."""
    top = sorted((lp.rank, tid, lp.logprob) for tid, lp in d.items() if lp.rank is not None and lp.rank <= n)[:n]
    return TokenLogprob(token, d[token].logprob, tuple((tid, v) for _, tid, v in top))


def logprobs_of(token_ids, sample_logprobs, n: int | None) -> list[TokenLogprob] | None:
    if n is None or sample_logprobs is None:
        return None
    return [token_logprob(t, d, n) for t, d in zip(token_ids, sample_logprobs, strict=True)]


def prompt_logprobs_of(prompt_ids: list[int], prompt_logprobs, n: int | None) -> list[TokenLogprob | None] | None:
    if n is None or prompt_logprobs is None:
        return None
    return [None if d is None else token_logprob(t, d, n) for t, d in zip(prompt_ids, prompt_logprobs, strict=True)]


class FeatureReader:
    """Reads feature entries from the workers: concurrent `take`s share one `collective_rpc` (those that arrive while
    one is in flight share the next)."""

    def __init__(self, llm):
        self.llm = llm
        self.asks: dict[str, tuple[list, asyncio.Future]] = {}
        self.task: asyncio.Task | None = None

    async def take(self, tag: str, upto: int, prompt: bool) -> dict:
        """{"prompt": [...] (once, when asked), "generated": [...]}: entries ({"L": [[feature, activation]...]}) of the
        generated tokens not taken before, up to `upto`."""
        fut = asyncio.get_running_loop().create_future()
        self.asks[tag] = ([upto, prompt], fut)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._pump())
        return await fut

    async def _pump(self) -> None:
        while self.asks:
            batch, self.asks = self.asks, {}
            try:
                got = await self.llm.collective_rpc("functok_features", args=({t: a for t, (a, _) in batch.items()},))
            except Exception as e:
                for _, fut in batch.values():
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for tag, (_, fut) in batch.items():
                if not fut.done():
                    fut.set_result(merge([g.get(tag, {}) for g in got if g]))

    async def drop(self, tag: str) -> None:
        try:
            await self.llm.collective_rpc("functok_features_drop", args=(tag,))
        except Exception:
            log.debug("could not drop the features of %s", tag, exc_info=True)


def merge(parts: list[dict]) -> dict:
    """One request's entries from every worker: each worker reads the layers it holds (pipeline parallel); under
    tensor parallelism every rank reads the same, so the union of their layers is any one's."""
    out: dict = {}
    for part in parts:
        for key in ("prompt", "generated"):
            rows = part.get(key)
            if rows is None:
                continue
            have = out.setdefault(key, [])
            for j, layers in enumerate(rows):
                if j == len(have):
                    have.append({})
                have[j].update(layers)
    return out


def merge_series(parts: list[dict | None]) -> dict | None:
    """One request's readout from every worker's `SeriesReadout.take` ({"positions", "values", "columns"}): under
    pipeline parallelism each rank fills the columns of the layers it holds; under tensor parallelism any one's is
    every one's. None when no worker read it."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    out = {"positions": parts[0]["positions"], "values": [list(row) for row in parts[0]["values"]]}
    for p in parts[1:]:
        if p["positions"] != out["positions"]:
            log.warning("the workers read different positions of one readout; keeping the first one's")
            continue
        for row, theirs in zip(out["values"], p["values"], strict=True):
            for c in p["columns"]:
                row[c] = theirs[c]
    return out


def entries(ids: list[int], first_position: int, layer_rows: list[dict], order) -> list[dict]:
    """API feature entries from a worker's rows: token ids, their positions, the layers in the request's order."""
    return [
        {"token_id": t, "position": first_position + j, "layers": {str(L): layers.get(str(L), []) for L in order}}
        for j, (t, layers) in enumerate(zip(ids, layer_rows, strict=False))
    ]
