"""Throughput of the transformers engine's dynamic batching, steered and not, against the usual research paths.

One run on the demo model (float32, CPU, `--threads` threads), 16 concurrent requests of `--tokens` tokens each:

  engine, unsteered / steered   16 concurrent requests through HFEngine (in-process), 16 distinct steering specs
  sequential generate + hook    the same 16 requests one by one with model.generate and one global steering hook
  static batched generate       one model.generate of the 16 prompts, left-padded, unsteered (the ceiling)
  HTTP, unsteered / steered     16 concurrent openai-client streams to a `functok serve` subprocess (end to end)

Every request generates exactly `--tokens` tokens (ignore_eos / min_new_tokens), so tokens/s compare like for like.
After a warm-up, the modes run in turn `--repeats` times (interleaved, so a busy spell on a shared machine hits every
mode alike); the table shows each mode's median. Writes benchmarks/results/bench_server-*.json.

    .venv/bin/python benchmarks/bench_server.py [--tokens 64] [--requests 16] [--threads 2] [--no-http]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prompts, write_result  # noqa: E402

from functok_vllm.core import SAE, SteeringTable  # noqa: E402
from functok_vllm.engines.base import GenerateRequest, SamplingParams
from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig
from functok_vllm.engines.hf.hooks import load_model
from functok_vllm.engines.placement import residual_hooks
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES
from functok_vllm.steering import SteeringSpec  # noqa: E402


def specs(n: int) -> list[SteeringSpec]:
    """n distinct specs: adds at layers 1-2 (function positions), every fourth a clamp at layer 1 on all positions."""
    out = []
    for i in range(n):
        edits = [{"layer": 1 + i % 2, "feature": 100 + 37 * i, "strength": 6.0 + i}]
        if i % 4 == 3:
            edits.append({"layer": 1, "feature": 50 + i, "mode": "clamp", "value": 2.0})
        out.append(SteeringSpec.from_dict({"edits": edits, "positions": "all" if i % 4 == 3 else "function"}))
    return out


class EngineModes:
    """16 concurrent requests through HFEngine in-process, unsteered or each with its own spec."""

    def __init__(self, ps, ss, tokens, threads, **config):
        saes = sorted(DEMO_SAES.glob("layer_*"))
        self.engine = HFEngine(
            HFEngineConfig(DEMO_MODEL, saes, DEMO_FUNCTION_TOKENS, max_running=len(ps), threads=threads, **config)
        )
        self.ps, self.ss, self.params, self.n = ps, ss, SamplingParams(0, max_tokens=tokens, ignore_eos=True), 0
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())

    async def _one(self, prompt, spec) -> int:
        self.n += 1
        got = 0
        async for d in self.engine.generate(
            GenerateRequest(f"b{self.n}", self.engine.encode(prompt), self.params, spec)
        ):
            got += len(d.token_ids)
        return got

    async def _all(self, steer: bool) -> list[int]:
        return await asyncio.gather(
            *(self._one(p, s if steer else None) for p, s in zip(self.ps, self.ss, strict=True))
        )

    def run(self, steer: bool) -> int:
        return sum(self.loop.run_until_complete(self._all(steer)))

    def close(self):
        self.loop.run_until_complete(self.engine.shutdown())
        self.loop.close()


class GenerateModes:
    """The research path on a plain model (SDPA attention): one request at a time with a hook steering every position
    (the core's SteeringLayer, one slot), and one static left-padded batch without steering."""

    def __init__(self, ps, ss, tokens):
        self.model, self.tok = load_model(DEMO_MODEL, dtype=torch.float32)
        self.saes = {sae.layer: sae for sae in (SAE.load(p) for p in sorted(DEMO_SAES.glob("layer_*")))}
        self.ps, self.ss = ps, ss
        self.gen = dict(
            max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=self.tok.eos_token_id
        )

    def sequential(self) -> int:
        n = 0
        for p, spec in zip(self.ps, self.ss, strict=True):
            table = SteeringTable({layer: self.saes[layer] for layer in spec.layers}, max_slots=2, max_tokens=4096)
            table.set_slot_index(torch.full((4096,), table.acquire(spec)))
            ids = torch.tensor([self.tok.encode(p)])
            with torch.inference_mode(), residual_hooks(self.model, dict(table.layers)):
                n += self.model.generate(ids, **self.gen).shape[1] - ids.shape[1]
        return n

    def static(self) -> int:
        self.tok.padding_side = "left"
        batch = self.tok(self.ps, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(**batch, **self.gen)
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(self.ps)


class HTTPModes:
    """16 concurrent openai-client streams to a `functok serve` subprocess."""

    def __init__(self, ps, ss, tokens, threads):
        import openai

        from functok_vllm.launch import functok_serve, start

        self.server = start(functok_serve("--threads", str(threads)))
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="none", max_retries=0)
        self.ps, self.ss, self.tokens = ps, ss, tokens
        self.pool = ThreadPoolExecutor(len(ps))

    def _stream(self, prompt, spec) -> int:

        extra = {"ignore_eos": True, "stream_options": {"include_usage": True}}
        if spec is not None:
            extra["steering"] = spec.user_form()
        chunks = self.client.completions.create(
            model="functok-tiny", prompt=prompt, max_tokens=self.tokens, temperature=0, stream=True, extra_body=extra
        )
        return [c for c in chunks if c.usage][-1].usage.completion_tokens

    def run(self, steer: bool) -> int:
        jobs = [self.pool.submit(self._stream, p, s if steer else None) for p, s in zip(self.ps, self.ss, strict=True)]
        return sum(j.result() for j in jobs)

    def close(self):
        self.server.stop(grace_s=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-http", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ps, ss = prompts(args.requests), specs(args.requests)
    engine, plain = EngineModes(ps, ss, args.tokens, args.threads), GenerateModes(ps, ss, args.tokens)
    modes = {
        "engine_unsteered": lambda: engine.run(False),
        "engine_steered": lambda: engine.run(True),
        "sequential_generate_hook": plain.sequential,
        "static_batched_generate": plain.static,
    }
    http = None if args.no_http else HTTPModes(ps, ss, args.tokens, args.threads)
    if http:
        modes |= {"http_unsteered": lambda: http.run(False), "http_steered": lambda: http.run(True)}
    times: dict[str, list[float]] = {name: [] for name in modes}
    tokens = {}
    stats0 = engine.engine.stats()
    try:
        for fn in modes.values():  # warm-up
            fn()
        for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every mode alike
            for name, fn in modes.items():
                t = time.perf_counter()
                tokens[name] = fn()
                times[name].append(time.perf_counter() - t)
    finally:
        engine.close()
        if http:
            http.close()
    stats1 = engine.engine.stats()
    steps = stats1["decode_steps"] - stats0["decode_steps"]
    mean_batch = (stats1["decode_rows"] - stats0["decode_rows"]) / max(steps, 1)
    res = {
        name: {"seconds": statistics.median(t), "all_seconds": t, "tokens": tokens[name]} for name, t in times.items()
    }
    for r in res.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    tps = {k: v["tokens_per_s"] for k, v in res.items()}
    ratios = {
        "steered / unsteered (engine), goal >= 0.9": tps["engine_steered"] / tps["engine_unsteered"],
        "engine steered / sequential generate+hook, goal >= 8": tps["engine_steered"] / tps["sequential_generate_hook"],
        "engine unsteered / static batched generate, goal >= 0.8": tps["engine_unsteered"]
        / tps["static_batched_generate"],
        "engine steered / static batched generate": tps["engine_steered"] / tps["static_batched_generate"],
    }
    if "http_steered" in tps:
        ratios["steered / unsteered (HTTP)"] = tps["http_steered"] / tps["http_unsteered"]
    print(f"\n{args.requests} requests x {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"engine: mean decode batch {mean_batch:.2f} requests over {steps} decode steps (in-process modes)")
    print(f"{'mode':<28}{'seconds':>10}{'tokens/s':>12}")
    for name, r in res.items():
        print(f"{name:<28}{r['seconds']:>10.3f}{r['tokens_per_s']:>12.1f}")
    for name, v in ratios.items():
        print(f"{name:<60}{v:>8.2f}")
    payload = {"args": vars(args), "mean_decode_batch": mean_batch, "results": res, "ratios": ratios}
    out = write_result("bench_server", payload, stamp=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
