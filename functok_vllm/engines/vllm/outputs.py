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
from functok_vllm.stop_when import StopWhen

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


class SharedRPC:
    """Asks the workers one `collective_rpc(method, args=({tag: ask, ...},))` for all the requests that ask at the same
    time (those that arrive while one is in flight share the next); each gets `combine` of the workers' answers for
    its tag."""

    def __init__(self, llm, method: str, combine):
        self.llm, self.method, self.combine = llm, method, combine
        self.asks: dict[str, tuple[list, asyncio.Future]] = {}
        self.task: asyncio.Task | None = None

    async def ask(self, tag: str, ask: list):
        fut = asyncio.get_running_loop().create_future()
        self.asks[tag] = (ask, fut)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._pump())
        return await fut

    async def _pump(self) -> None:
        while self.asks:
            batch, self.asks = self.asks, {}
            try:
                got = await self.llm.collective_rpc(self.method, args=({t: a for t, (a, _) in batch.items()},))
            except Exception as e:
                for _, fut in batch.values():
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for tag, (_, fut) in batch.items():
                if not fut.done():
                    fut.set_result(self.combine([g[tag] for g in got if g and tag in g]))


class FeatureReader(SharedRPC):
    """Reads feature entries from the workers, one shared `collective_rpc("functok_features")` at a time."""

    def __init__(self, llm):
        super().__init__(llm, "functok_features", merge)

    async def take(self, tag: str, upto: int, prompt: bool) -> dict:
        """{"prompt": [...] (once, when asked), "generated": [...]}: entries ({"L": [[feature, activation]...]}) of the
        generated tokens not taken before, up to `upto`."""
        return await self.ask(tag, [upto, prompt])

    async def drop(self, tag: str) -> None:
        try:
            await self.llm.collective_rpc("functok_features_drop", args=(tag,))
        except Exception:
            log.debug("could not drop the features of %s", tag, exc_info=True)


class MonitorReader(SharedRPC):
    """Reads a `stop_when`'s series of running requests as their deltas arrive, one shared
    `collective_rpc("functok_monitor")` at a time (`series_op.SeriesReadout.peek`)."""

    def __init__(self, llm):
        super().__init__(llm, "functok_monitor", lambda parts: parts[0] if parts else None)

    async def hit(self, tag: str, watch: StopWhen, since: int, count: int, tail: list[float]) -> int | None | str:
        """Where a "stop" monitor triggers among the `count` tokens of a delta, whose predicting positions start at
        `since`: an index into them, or None (`tail`, its latest values, updated), or an error message when the
        workers cannot give each value (pipeline parallel: the rank holding its layer reads it)."""
        want = list(range(since, since + count))
        try:
            got = await self.ask(tag, [watch.series, since])  # {"positions", "values"} from `since` on, or None
        except Exception as e:
            log.warning("could not read the stop_when series of request %s", tag, exc_info=True)
            return f"could not read stop_when's values from the vLLM workers ({type(e).__name__})"
        if got is None or got["positions"][:count] != want:
            have = None if got is None else got["positions"][:count]
            log.error(
                "request %s: stop_when's values at positions %s are missing (the workers have %s)", tag, want, have
            )
            return f"the vLLM workers have no stop_when values at positions {since}..{since + count - 1}"
        seen = tail + got["values"][:count]
        at = watch.trigger(seen)
        if at is None:
            tail[:] = seen[len(seen) - watch.tokens + 1 :]  # a run that can still complete
            return None
        return at - (len(seen) - count)


def cut_text(tokenizer, before: list[int], kept: list[int], sent: str, skip_special: bool) -> str:
    """The text of `kept`, the tokens of a delta up to a monitor's trigger (vLLM's text covers the whole delta)."""
    full = tokenizer.decode(before + kept, skip_special_tokens=skip_special)
    return full[len(sent) :] if full.startswith(sent) else tokenizer.decode(kept, skip_special_tokens=skip_special)


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
